"""The `batchd` command as an operator uses it: up, submit, status, health."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from batchd.cli import build_parser
from batchd.commands import parse_size


def batchd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchd.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_up_with_an_embedded_server_serves_submit_status_and_health():
    up = subprocess.Popen([sys.executable, "-m", "batchd.cli", "up", "--engine", "echo"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = up.stdout.readline()
            match = re.search(r"server at (redis://\S+)", line)
            url = match.group(1) if match else None
        assert url, "batchd up did not print its server URL"
        for _ in range(100):
            if batchd("health", "--redis", url, "--require-workers", "1").returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no live worker behind batchd up")

        answer = batchd("submit", "--redis", url, "hello from the cli")
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == "hello from the cli"
        assert "stop" in answer.stderr

        streamed = batchd("submit", "--redis", url, "--stream", "streamed")
        assert streamed.stdout.strip() == "streamed"

        status = json.loads(batchd("status", "--redis", url, "--json").stdout)
        assert len(status["workers"]) == 1 and status["workers"][0]["engine"] == "echo"
        assert status["requests_dispatched"] >= 2
        assert "live workers 1" in batchd("status", "--redis", url).stdout
    finally:
        up.terminate()
        up.wait(timeout=60)
    assert up.returncode == 0


def test_health_fails_clearly_without_redis_or_workers(redis_server):
    gone = batchd("health", "--redis", "redis://127.0.0.1:1/0")
    assert gone.returncode == 1 and "unhealthy: Redis" in gone.stdout
    lonely = batchd("health", "--redis", redis_server.url, "--require-workers", "1")
    assert lonely.returncode == 1 and "0 live workers" in lonely.stdout
    missing = batchd("health", "--redis", redis_server.url, "--worker-id", "nobody")
    assert missing.returncode == 1 and "nobody" in missing.stdout


def test_submit_reports_a_typed_error_instead_of_a_traceback(daemons):
    daemons.scheduler()
    daemons.echo_worker()
    daemons.wait_for_workers(1)
    bad = batchd("submit", "--redis", daemons.url, "x", "--max-new-tokens", str(10**9))
    assert bad.returncode == 1
    assert "error (invalid_request)" in bad.stderr and "Traceback" not in bad.stderr


def test_every_subcommand_has_help():
    parser = build_parser()
    for command in ("scheduler", "worker", "up", "demo", "submit", "status", "health", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize("text, size", [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1e9", 10**9),
                                        ("100", 100), ("1.5 GB", 1_500_000_000)])
def test_kv_memory_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size


def test_an_unreadable_size_says_how_to_write_it():
    with pytest.raises(SystemExit, match="2GiB"):
        parse_size("two gigs")


def test_a_worker_whose_model_is_missing_exits_with_the_reason(redis_server):
    result = batchd("worker", "--redis", redis_server.url, "--model", "/no/such/model")
    assert result.returncode == 2
    assert "neither a checkpoint folder" in result.stderr and "Traceback" not in result.stderr


def test_a_contrast_pair_that_does_not_share_a_tokenizer_is_refused_at_start(tmp_path, redis_server):
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    for name, vocab in (("after", 32), ("before", 48)):
        config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        words = {f"w{i}": i for i in range(vocab)}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0"))).save_pretrained(
            tmp_path / name)
    result = batchd("worker", "--redis", redis_server.url, "--model", str(tmp_path / "after"),
                    "--contrast-model", str(tmp_path / "before"), "--device", "cpu", timeout=120)
    assert result.returncode == 2
    assert "does not share the tokenizer" in result.stderr and "Traceback" not in result.stderr
