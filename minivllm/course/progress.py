"""Which parts of the engine run the learner's code: their workspace, read back part by part.

Every exercise that plugs into the engine is saved to the learner's workspace once it passes its check
(``minivllm.course.workspace``); :func:`minivllm.learner.load_parts` reads the folder back and checks each file
again. :func:`workspace_status` groups that report by the parts of the engine's picture
(``minivllm.course.diagrams.COMPONENTS``): each :class:`PartStatus` lists the exercises that plug into the part
and which of them are the learner's. ``diagrams.learner_map`` draws it.
"""

import pathlib
from dataclasses import dataclass

from minivllm.course.diagrams import COMPONENTS

PLUGS = {"store_kv": "paged KV cache", "paged_attention": "paged attention"}  # where a phase has two parts


def part_of(component: str) -> str | None:
    """The part of the engine that a learner component (a name of ``minivllm.learner.COMPONENTS``) plugs into."""
    from minivllm.learner import COMPONENTS as LEARNER

    if component in PLUGS:
        return PLUGS[component]
    phase = LEARNER[component].phase if component in LEARNER else None
    return next((c.name for c in COMPONENTS if c.phase == phase), None)


@dataclass(frozen=True, slots=True)
class PartStatus:
    """One part of the engine, as the learner's workspace has it."""

    name: str
    exercises: tuple[str, ...]  # learner components that plug into it
    yours: tuple[str, ...]  # of those, the ones in the workspace that pass their check
    on_gpu_only: tuple[str, ...] = ()  # of ``yours``, kernels that run only on a GPU (here the model uses torch)

    @property
    def state(self) -> str:
        if not self.exercises:
            return "no exercise"
        return "yours" if len(self.yours) == len(self.exercises) else "partly yours" if self.yours else "to write"

    @property
    def note(self) -> str:
        if not self.exercises:
            return "package's"
        n, k = len(self.exercises), len(self.yours)
        where = " (GPU)" if self.on_gpu_only and len(self.on_gpu_only) == k else ""
        return f"yours{where}" if k == n else f"{k}/{n} yours" if k else f"0/{n}"


def workspace_status(workspace: str | pathlib.Path | None = None, device: str = "cpu") -> dict[str, PartStatus]:
    """Each part of the engine with the learner components that plug into it and which of them are yours:
    in the workspace (``minivllm.learner.default_workspace()`` unless given) and passing their load-time check
    (:func:`minivllm.learner.load_parts`). A GPU-only kernel cannot be checked on a CPU: there, a saved one
    counts as yours (it passed the notebook's check when it was saved)."""
    from minivllm import learner

    folder = pathlib.Path(workspace) if workspace is not None else learner.default_workspace()
    report = learner.load_parts(folder, device).report
    exercises: dict[str, list[str]] = {c.name: [] for c in COMPONENTS}
    yours: dict[str, list[str]] = {c.name: [] for c in COMPONENTS}
    gpu: dict[str, list[str]] = {c.name: [] for c in COMPONENTS}
    for name, whose, _ in report:
        part = part_of(name)
        if part is None:
            continue
        exercises[part].append(name)
        saved_for_gpu = (learner.COMPONENTS[name].gpu_only and not str(device).startswith("cuda")
                         and (folder / f"{name}.py").is_file())
        if whose == "yours" or saved_for_gpu:
            yours[part].append(name)
        if saved_for_gpu:
            gpu[part].append(name)
    return {c.name: PartStatus(c.name, tuple(exercises[c.name]), tuple(yours[c.name]), tuple(gpu[c.name]))
            for c in COMPONENTS}
