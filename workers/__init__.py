"""The worker daemon and its engines.

This top level imports no torch: the shell (worker.py, the loop; outbox.py,
what it sends; holdings.py, what it holds; lease.py, cancels.py), the engine
contract (engine.py), the rules a request must meet (validation.py) and the
echo engine. hf/ holds the engine for real models and everything that needs
torch. Nothing here imports the scheduler.
"""
