"""Environment for the scripts the tests start as child processes (plain or under torchrun)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A parent's torchrun variables would make a child join the wrong job; an opt-in to trusted pickle
# loading would hide what the safe loader refuses.
_DROPPED = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'EDM2_TRUST_PICKLE')


def child_env(**extra: str) -> dict:
    """os.environ without torchrun variables, the repo on PYTHONPATH, one thread per process, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    env.update(extra)
    return env
