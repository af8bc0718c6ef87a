"""The step scheduler alone, with no model: admission by blocks, the prompt budget, preemption,
and requests that share a prefix computing it once.

A fake engine stands in for the model: every row that asks for logits "samples" the token
1000 + its position, so a request's tokens say where they came from and a repeated or lost
token shows.
"""

from __future__ import annotations

from batchd.client.protocol import SamplingParams
from batchd.workers.engine import EngineRequest
from batchd.workers.hf.blocks import BlockManager
from batchd.workers.hf.scheduler import Scheduler
from batchd.workers.hf.sequence import Sequence, Status

SIZE = 4


def _sequence(request_id: str, prompt: list[int], max_new_tokens: int) -> Sequence:
    return Sequence(EngineRequest(request_id, prompt, SamplingParams(max_new_tokens=max_new_tokens)), None, frozenset())


class FakeEngine:
    def __init__(self, num_blocks: int, slots: int = 4, budget: int = 64, burst: int | None = None):
        self.scheduler = Scheduler(BlockManager(num_blocks, SIZE), slots, budget, burst_prefill_tokens=burst)
        self.plans = []

    def step(self) -> None:
        plan = self.scheduler.schedule()
        self.plans.append(plan)
        self.scheduler.launched(plan)
        for sequence, chunk in zip(plan.sequences, plan.chunks):
            if not chunk.want_logits:
                continue
            token = 1000 + chunk.start + len(chunk.token_ids)
            sequence.generated.append(token)
            sequence.token_ids.append(token)
            self.scheduler.learn(sequence)
            if len(sequence.generated) == sequence.request.params.max_new_tokens:
                self.scheduler.finish(sequence)

    def run(self, sequences: list[Sequence], max_steps: int = 500, add: bool = True) -> None:
        for sequence in sequences if add else ():
            self.scheduler.add(sequence)
        for _ in range(max_steps):
            if all(s.status is Status.FINISHED for s in sequences):
                return
            self.step()
        raise AssertionError("the scheduler stopped making progress")


def _expected(prompt: list[int], max_new_tokens: int) -> list[int]:
    return [1000 + len(prompt) + i for i in range(max_new_tokens)]


def test_the_youngest_request_is_preempted_and_resumes_with_every_token_intact():
    # 6 usable blocks (24 positions): two requests that each grow to 5 blocks cannot both fit.
    engine = FakeEngine(num_blocks=7)
    old, young = _sequence("old", [1] * 5, 14), _sequence("young", [2] * 5, 14)
    engine.run([old, young])
    assert engine.scheduler.stats.preemptions >= 1
    assert young.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.generated == _expected([1] * 5, 14) and young.generated == _expected([2] * 5, 14)
    preempted = [s.request_id for plan in engine.plans for s in plan.preempted]
    assert set(preempted) == {"young"}
    assert engine.scheduler.blocks.num_used == 0


def test_admission_waits_for_blocks_and_keeps_a_reserve():
    engine = FakeEngine(num_blocks=5)  # 4 usable blocks
    first, second = _sequence("a", [1] * 8, 2), _sequence("b", [2] * 8, 2)
    engine.scheduler.add(first)
    engine.scheduler.add(second)
    engine.step()
    # "a" took 2 blocks; "b" needs 2 more, which would leave none for "a" to grow into.
    assert first.status is Status.RUNNING and second.status is Status.WAITING
    engine.run([first, second], add=False)
    assert second.generated == _expected([2] * 8, 2)


def test_a_long_prompt_is_prefilled_under_the_budget_while_others_decode():
    engine = FakeEngine(num_blocks=64, budget=10)
    short = _sequence("short", [1, 2, 3], 20)
    engine.scheduler.add(short)
    engine.step()
    long = _sequence("long", list(range(50, 95)), 3)
    engine.run([short, long])
    for plan in engine.plans:
        assert sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1) <= 10
    steps_with_long_piece = [plan for plan in engine.plans if any(s is long and len(c.token_ids) > 1
                                                                 for c, s in zip(plan.chunks, plan.sequences))]
    assert len(steps_with_long_piece) == 5  # 45 tokens in pieces of at most 10
    assert all(any(s is short for s in plan.sequences) for plan in steps_with_long_piece)  # short never stalled
    assert long.generated == _expected(list(range(50, 95)), 3)


def test_requests_admitted_together_compute_their_shared_prefix_once():
    engine = FakeEngine(num_blocks=64, slots=8, budget=64)
    system = list(range(100, 130))  # 7 full blocks and 2 tokens
    questions = [[7], [8, 8], [9, 9, 9], [10, 10, 10, 10]]
    sequences = [_sequence(f"q{i}", system + q, 2) for i, q in enumerate(questions)]
    engine.run(sequences)
    stats = engine.scheduler.stats
    assert stats.prompt_tokens_computed == len(system) + sum(map(len, questions))
    assert stats.prefix_cache_hits == 3 * len(system)
    for sequence, question in zip(sequences, questions):
        assert sequence.generated == _expected(system + question, 2)
    # The later ones copied the two system tokens of the block the first one's question starts in.
    assert sum(len(plan.copies) for plan in engine.plans) == 3


def test_a_waiting_request_takes_over_a_prefix_whose_writer_went_away():
    """The reader shares the writer's planned blocks in the step both are admitted; that step
    fails before it is launched (the engine ends the writer, whose piece it held): nobody
    writes those blocks now, so the reader computes them itself."""
    engine = FakeEngine(num_blocks=64, slots=4, budget=64)
    prefix = list(range(200, 224))  # 6 full blocks
    writer, reader = _sequence("writer", prefix + [1], 2), _sequence("reader", prefix + [2], 2)
    engine.scheduler.add(writer)
    engine.scheduler.add(reader)
    plan = engine.scheduler.schedule()
    assert plan.sequences == [writer] and reader.num_cached == 24  # it waits on the writer's blocks
    engine.scheduler.finish(writer, keep=False)
    engine.run([reader], add=False)
    assert reader.generated == _expected(prefix + [2], 2)
    assert engine.scheduler.stats.prompt_tokens_computed == 25


def test_a_request_resumed_after_preemption_reads_its_own_blocks_back():
    engine = FakeEngine(num_blocks=9, slots=2)  # 8 usable blocks; together they grow to 12
    old, young = _sequence("old", [1] * 8, 16), _sequence("young", [2] * 8, 16)
    engine.run([old, young])
    assert young.num_preemptions >= 1
    # Its first blocks outlived the eviction its preemption led to (a prefix's tail goes
    # first): found again, not recomputed.
    assert engine.scheduler.stats.prefix_cache_hits >= 2 * SIZE
    assert young.generated == _expected([2] * 8, 16) and old.generated == _expected([1] * 8, 16)


def _prompt_tokens_per_step(engine: FakeEngine) -> list[int]:
    return [sum(len(c.token_ids) for c in plan.chunks if len(c.token_ids) > 1 or not c.want_logits)
            for plan in engine.plans]


def test_a_stream_of_short_prompts_keeps_the_base_budget():
    engine = FakeEngine(num_blocks=400, slots=8, budget=16, burst=64)
    sequences = []
    for index in range(6):  # one short prompt at a time: the backlog never builds up
        sequence = _sequence(f"r{index}", [index + 1] * 30, 3)
        sequences.append(sequence)
        engine.scheduler.add(sequence)
        assert engine.scheduler.step_budget() == 16
        engine.run([sequence], add=False)
    assert max(_prompt_tokens_per_step(engine)) == 16
    assert all(s.generated == _expected(s.request.prompt_token_ids, 3) for s in sequences)


def test_a_burst_raises_the_budget_up_to_the_burst_budget_and_back():
    engine = FakeEngine(num_blocks=400, slots=8, budget=16, burst=64)
    burst = [_sequence(f"b{index}", [index + 1] * 40, 2) for index in range(8)]
    for sequence in burst:
        engine.scheduler.add(sequence)
    # 320 prompt tokens wait: a quarter of them is over the burst budget.
    assert engine.scheduler.step_budget() == 64
    engine.run(burst, add=False)
    carried = _prompt_tokens_per_step(engine)
    assert carried[0] == 64
    # As the backlog drains the budget falls back: never under the base while prompts wait.
    assert all(tokens <= 64 for tokens in carried)
    assert engine.scheduler.step_budget() == 16
    # Fewer steps than the base budget would have taken to compute 320 prompt tokens.
    assert sum(1 for tokens in carried if tokens) < 320 // 16
    assert all(s.generated == _expected(s.request.prompt_token_ids, 2) for s in burst)


def test_only_waiting_requests_with_a_free_row_count_toward_the_backlog():
    engine = FakeEngine(num_blocks=400, slots=1, budget=16, burst=64)
    for index in range(20):  # 20 prompts of 40 wait, but one row: only one can start
        engine.scheduler.add(_sequence(f"w{index}", [index + 1] * 40, 1))
    assert engine.scheduler.step_budget() == 16  # 40 // 4 = 10: the base


def test_the_burst_budget_cannot_be_below_the_base():
    import pytest

    with pytest.raises(ValueError, match="burst_prefill_tokens"):
        Scheduler(BlockManager(10, SIZE), 2, 32, burst_prefill_tokens=16)
