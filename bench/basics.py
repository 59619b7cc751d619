"""Phase 01 on the GPU: copy bandwidth (numba vs torch) and kernel launch overhead.

    python -m bench.run basics        # writes bench/results/01_basics.json
"""

from kernels._measure import bandwidth_sweep, launch_overhead


def run() -> dict:
    data = {"bandwidth": bandwidth_sweep(), "launch_us": launch_overhead()}
    best = {name: max(v) for name, v in data["bandwidth"]["series"].items()}
    for name, gbps in best.items():
        print(f"{name:28s} best {gbps:7.0f} GB/s")
    for name, us in data["launch_us"].items():
        print(f"{name:40s} {us:7.1f} us/call")
    return data
