"""Checks for the exercises whose answer is a behaviour, not a value: the scheduler's plan (phase 11) and the
engine's step (phase 12).

Both follow :func:`minivllm.course.check`'s contract: an exercise still raising ``NotImplementedError`` says
"not attempted" and hands back the package's version (in ``solutions/`` that is an error); a wrong answer
raises :class:`~minivllm.course.checks.CheckFailed` naming the first step that differs and a small
reproduction; a passing one is saved to the learner's workspace.
"""

from collections.abc import Callable

from minivllm import learner
from minivllm.course import checks


def _verdict(candidate: Callable, reference: Callable, name: str, component: str, problem: str | None,
             passed: str) -> Callable:
    if problem is None:  # the stub raised
        if checks._STRICT:
            raise checks.CheckFailed(f"❌ {name}: the solution is still a stub (NotImplementedError)")
        print(f"⏭️  {name}: not attempted yet — continuing with the package's version")
        checks._FALLBACKS.add(id(reference))
        return reference
    if problem:
        raise checks.CheckFailed(f"❌ {name}: {problem}")
    print(f"✅ {name}: {passed}")
    from minivllm.course.workspace import record

    record(component, candidate)
    return candidate


def _attempted(fn: Callable, *args) -> bool:
    try:
        fn(*args)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 -- a wrong attempt: the comparison below says where
        pass
    return True


def check_schedule(schedule: Callable, seeds=range(60), *, name: str = "schedule") -> Callable:
    """``schedule(sched) -> (plan, preempted, finished)`` against the package's ``Scheduler.plan``, plan by plan.

    Runs both schedulers side by side on seeded random workloads (ties in arrival and length, shared prefixes,
    chunked prefill, a KV pool small enough to preempt) and compares every step. Returns the function the
    notebook should use: ``schedule``, or the package's ``Scheduler.plan`` if the exercise is not attempted."""
    from minivllm.scheduler import Scheduler

    probe = learner.random_workload(0).scheduler()
    probe.add(learner.random_workload(0).sequences()[0][1])
    problem = learner.check_schedule(schedule, seeds) if _attempted(schedule, probe) else None
    return _verdict(schedule, Scheduler.plan, name, "schedule", problem,
                    f"{len(seeds)}/{len(seeds)} random workloads planned step for step as the package's scheduler")


def check_step(step: Callable, *, name: str = "step") -> Callable:
    """``step(engine)`` against ``LLMEngine.step``: the calls it makes on a recording engine (which, in what order,
    with which arguments) and what it returns. Returns ``step``, or ``LLMEngine.step`` if not attempted."""
    from minivllm.engine import LLMEngine

    problem = None
    if _attempted(step, learner._Recorder()):
        try:
            problem = learner.CHECKS["step"](step, "cpu")
        except Exception as e:  # noqa: BLE001 -- the learner's step may raise anything: say what
            problem = f"your step raised {type(e).__name__}: {e}"
    return _verdict(step, LLMEngine.step, name, "step", problem,
                    "schedule, execute, sample, postprocess, process: the package's calls, in its order")
