"""Scaling out on fake CPU devices: per-device bytes of the train state and the collectives of
the compiled train step, on 1, 2, 4 and 8 devices with the same global batch, under data
parallelism, FSDP, tensor parallelism and (on 8) all three at once.

  python benchmarks/scaling.py [--config configs/clip.py:B/32] [--batch 256]
      [--devices 1 2 4 8] [--modes dp fsdp tp mixed] [--no_scan] [--set key=value ...]
      [--hlo_dir DIR] [--time [--steps 5]]

Modes on N devices: dp (mesh.data=N), fsdp (mesh.fsdp=N), tp (mesh.model=N; n/a where N does
not divide a sharded dimension, e.g. ViT-B's 12 heads on 8), mixed (data 2 x fsdp 2 x model 2,
on 8 only). On 1 device the modes coincide and one row is printed. Each row is a fresh
Experiment on the first N of 8 fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=8).
Paper recipes are measured with their layer stacks scanned (model.image.scan, model.text.scan;
--no_scan keeps them as written): the same parameters, sharded the same way, and a step that
compiles in seconds. A tokenizer that cannot be built here is replaced by one of the recipe's
vocabulary size, as compile_time.py does.

The step is the trainer's (Experiment.train_step), lowered and compiled for the abstract
train state and batch as compile_time.py does, traced as train.py traces it: under the mesh,
with the config's logical-axis rules in force inside the step (sharding.under_rules), so the
models' activation constraints (nn.with_logical_constraint) take effect.

What each figure means (all per device, nothing allocated unless --time):
  params, opt state, state   bytes of this device's shards of the parameters, the optimizer
                             state and the whole train state (EMA, batch statistics, step and
                             rng included), from the abstract state (sharding_report.build_report,
                             as train --dry_run prints them).
  replicated                 bytes of parameters that no mesh axis splits, though N > 1 (each
                             device holds them whole), and the largest of them.
  args (XLA)                 XLA's own count of the compiled step's arguments (the state's and
                             the batch's shards): a check on the state column.
  temp (XLA)                 XLA's buffer assignment of every intermediate of the step, packed by
                             liveness (compiled.memory_analysis(): activations, gradients,
                             optimizer temporaries).
  GFLOP (XLA)                XLA's cost analysis of the compiled per-device program: the work
                             one device does in a step (it falls as 1/N only where the batch's
                             work is split). XLA counts a while loop's body once, so it is
                             shown only for steps without loops (--no_scan, convnet towers).
  all-reduce ... permute     collectives of the compiled step (compiled.as_text(), after SPMD
                             partitioning) as "executions (MiB)": each collective counted as
                             often as it runs in one step (an op in a scanned layer's loop body
                             counts trip-count times), MiB the sum of the arrays it operates on
                             as a whole: all-reduce its operand, all-gather its gathered result,
                             reduce-scatter its operand before scattering, all-to-all and
                             collective-permute their result. XLA combines many small
                             all-reduces into one op over a tuple: that is one execution.
  in loss                    of those, the ones made wholly inside a shard_map: the contrastive
                             loss's all-gather of the embeddings over the batch axes and, in its
                             transpose, the reduce-scatter of their gradients (a collective that
                             XLA combined with the gradients' all-reduce is not counted here).
                             Collectives over groups of one device move nothing and are left out.
  step s                     with --time only: median seconds of a train step on real arrays.
                             Fake devices all share this machine's cores, so N devices do N
                             times the work on the same cores plus the copies between them:
                             these times say nothing about scaling on real devices.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_contrast import config as config_lib, sharding_report  # noqa: E402
from big_contrast.experiment import Experiment, build_tokenizer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_time import tokenizer_overrides  # noqa: E402
from machine import cpu_name  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2 ** 20
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
MODES = ("dp", "fsdp", "tp", "mixed")


def mesh_of(mode: str, n: int) -> dict | None:
    """The mesh of ``mode`` on ``n`` devices, or None where the mode does not apply."""
    if n == 1:
        return {"data": 1, "fsdp": 1, "model": 1} if mode == "dp" else None
    return {"dp": {"data": n, "fsdp": 1, "model": 1},
            "fsdp": {"data": 1, "fsdp": n, "model": 1},
            "tp": {"data": 1, "fsdp": 1, "model": n},
            "mixed": {"data": 2, "fsdp": 2, "model": 2} if n == 8 else None}[mode]


# ---------------------------------------------------------------- collectives in HLO text

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s"
                          r"(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_CALLEE = re.compile(r"\b(body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PARTITIONS = re.compile(r"num_partitions=(\d+)")
_LOSS = "shard_map"  # in the op_name metadata of what was traced inside jax.shard_map


def _array_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = 1 if dtype.startswith("f8") else _DTYPE_BYTES.get(dtype, 4)
        total += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * size
    return total


def _group_size(line: str, num_partitions: int) -> int:
    """Devices in each of the op's groups ('replica_groups={}': all of them)."""
    iota = _GROUPS_IOTA.search(line)
    if iota:
        return int(iota.group(2))
    listed = _GROUPS_LIST.search(line)
    if listed and listed.group(1):
        return len(listed.group(1).split(","))
    return num_partitions


def _from_loss(line: str) -> bool:
    """Whether everything the op was made of was traced inside a shard_map (XLA joins the
    op_names of combined ops with ':'; one that mixes the loss's psum with the gradients'
    all-reduce counts as not the loss's)."""
    name = _OP_NAME.search(line)
    return bool(name) and all(_LOSS in part for part in name.group(1).split(":"))


def count_collectives(hlo_text: str) -> dict:
    """{kind: [executions per step, bytes, executions in loss, bytes in loss]} of an optimised
    HLO module's text (compiled.as_text()). Ops inside a while loop's body count trip-count
    times (1 where XLA does not know the count; 'unknown_trips' says how many such loops,
    'loops' how many run more than once).
    Collectives over groups of one device (a 1-device mesh) move nothing and are left out."""
    partitions = _PARTITIONS.search(hlo_text[:hlo_text.find("\n")])
    num_partitions = int(partitions.group(1)) if partitions else 1
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith(" "):
            computations[current].append(line)
    callers: dict[str, list[tuple[str, int]]] = {}
    unknown_trips = loops = 0
    for name, lines in computations.items():
        for line in lines:
            trips = _TRIP_COUNT.search(line)
            for role, callee in _CALLEE.findall(line):
                factor = 1
                if role == "body":
                    factor = int(trips.group(1)) if trips else 1
                    unknown_trips += not trips
                    loops += factor > 1
                callers.setdefault(callee, []).append((name, factor))
            branches = _BRANCHES.search(line)
            for callee in (branches.group(1).split(",") if branches else ()):
                callers.setdefault(callee.strip().lstrip("%"), []).append((name, 1))
    runs: dict[str, int] = {}

    def executions(name: str) -> int:
        if name not in runs:
            runs[name] = 0  # guards against a cycle (none in valid HLO)
            runs[name] = 1 if name == entry else sum(
                executions(caller) * factor for caller, factor in callers.get(name, ()))
        return runs[name]

    counts = {kind: [0, 0, 0, 0] for kind in COLLECTIVES}
    for name, lines in computations.items():
        for line in lines:
            op = _INSTRUCTION.match(line)
            if not op or op.group(3) == "-start":  # an async pair is counted at its -done
                continue
            type_text, kind = op.group(1), op.group(2)
            group = _group_size(line, num_partitions)
            if group == 1:
                continue
            size = _array_bytes(type_text) * (group if kind == "reduce-scatter" else 1)
            times = executions(name)
            in_loss = _from_loss(line)
            row = counts[kind]
            row[0] += times
            row[1] += times * size
            row[2] += times * in_loss
            row[3] += times * size * in_loss
    counts["unknown_trips"], counts["loops"] = unknown_trips, loops
    return counts


# ---------------------------------------------------------------- one measurement

def scan_overrides(config, scan: bool) -> dict:
    """model.image.scan / model.text.scan where they apply (not to a convnet image tower)."""
    if not scan:
        return {}
    overrides = {}
    if "image" in config.model and config.model.image.get("type") != "convnet":
        overrides["model.image.scan"] = "true"
    if "text" in config.model and config.model.text.get("variant") != "bow":
        overrides["model.text.scan"] = "true"
    return overrides


def load(config_arg: str, mesh: dict, batch: int, scan: bool, settings: dict, folder: str):
    """The config with the mesh, global batch, scan and --set overrides; a tokenizer that
    cannot be built here stood in for by one of the recipe's vocabulary size."""
    path, _, arg = config_arg.partition(":")
    path = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO, path)
    config = config_lib.load_config_file(f"{path}:{arg}" if arg else path)
    overrides = {"batch_size": str(batch), **{f"mesh.{k}": str(v) for k, v in mesh.items()},
                 **scan_overrides(config, scan), **settings}
    config_lib.apply_overrides(config, overrides)
    try:
        build_tokenizer(config)
    except (OSError, ValueError):
        config_lib.apply_overrides(config, tokenizer_overrides(config, folder))
    return config


def replicated_params(report) -> tuple[int, str]:
    """(bytes per device of parameters no mesh axis splits, the largest one's path), on a mesh
    of more than one device."""
    if report.num_devices == 1:
        return 0, "-"
    whole = [r for r in report.rows if r.bytes_per_device == r.bytes]
    largest = max(whole, key=lambda r: r.bytes, default=None)
    return sum(r.bytes for r in whole), (f"{largest.path} {largest.shape}" if largest else "-")


def time_steps(exp, step_fn, abstract_batch_: dict, steps: int) -> float:
    """Median seconds of ``steps`` train steps on a real state and a random batch."""
    rng = np.random.default_rng(0)
    state = exp.state_factory.create()
    batch = {}
    for key, spec in abstract_batch_.items():
        if np.issubdtype(spec.dtype, np.integer) and key == "text":
            values = rng.integers(0, exp.config.text.vocab_size, spec.shape).astype(spec.dtype)
        else:
            values = rng.integers(0, 256, spec.shape).astype(spec.dtype)
        batch[key] = jax.device_put(values, spec.sharding)
    with jax.set_mesh(exp.mesh):
        state, metrics = step_fn(state, batch)  # compile and warm up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - began)
    return float(np.median(times))


def measure(config_arg: str, mode: str, n: int, batch: int, scan: bool, settings: dict,
            steps: int | None, hlo_dir: str | None = None) -> dict:
    """One row: state bytes, XLA memory and collectives of the train step of ``mode`` on the
    first ``n`` devices, or the reason it does not apply."""
    mesh = mesh_of(mode, n)
    row = {"mode": mode if n > 1 else "single", "devices": n, "mesh": mesh}
    with tempfile.TemporaryDirectory() as folder:
        config = load(config_arg, mesh, batch, scan, settings, folder)
        try:
            exp = Experiment(config, jax.devices()[:n], examples_per_epoch=batch)
        except config_lib.ConfigError as e:
            return {**row, "error": str(e)}
    abstract = exp.state_factory.abstract()
    report = sharding_report.build_report(abstract, exp.mesh)
    step = exp.train_step(abstract)
    batch_specs = exp.abstract_batch(batch)
    began = time.perf_counter()
    with jax.set_mesh(exp.mesh):
        compiled = step.lower(abstract, batch_specs).compile()
    row["compile_s"] = time.perf_counter() - began
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    row.update(params=report.per_device["params"], opt_state=report.per_device["opt_state"],
               state=report.per_device["total"], param_count=report.param_count,
               param_bytes=report.param_bytes,
               args=getattr(memory, "argument_size_in_bytes", None),
               temp=getattr(memory, "temp_size_in_bytes", None), flops=cost.get("flops"),
               collectives=count_collectives(compiled.as_text()))
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{n}_{row['mode']}.hlo.txt"), "w") as f:
            f.write(compiled.as_text())
    row["replicated"], row["largest_replicated"] = replicated_params(report)
    if steps:
        row["step_s"] = time_steps(exp, step, batch_specs, steps)
    return row


# ---------------------------------------------------------------- the table

def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f}"


def _mesh_text(mesh: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in mesh.items() if v > 1) or "1 device"


def _flops_known(row: dict) -> bool:
    return "error" not in row and row["flops"] is not None and not row["collectives"]["loops"]


def format_row(row: dict, timed: bool, flops: bool) -> str:
    head = f"| {row['devices']} | {row['mode']} | {_mesh_text(row['mesh'])} |"
    columns = 9 + flops + len(COLLECTIVES) + timed
    if "error" in row:
        reason = row["error"].replace("|", "/")
        return head + f" n/a: {reason} |" + " |" * (columns - 1)
    c = row["collectives"]
    cells = [_mib(row["params"]), _mib(row["opt_state"]), _mib(row["state"]),
             _mib(row["replicated"]), f"`{row['largest_replicated']}`", _mib(row["args"]),
             _mib(row["temp"])]
    if flops:
        cells.append(f"{row['flops'] / 1e9:,.0f}" if _flops_known(row) else "-")
    cells += [f"{c[k][0]} ({c[k][1] / MiB:,.1f})" if c[k][0] else "-" for k in COLLECTIVES]
    loss_runs = sum(c[k][2] for k in COLLECTIVES)
    loss_bytes = sum(c[k][3] for k in COLLECTIVES)
    cells.append(f"{loss_runs} ({loss_bytes / MiB:,.1f})" if loss_runs else "-")
    if timed:
        cells.append(f"{row['step_s']:.3f}")
    return head + "".join(f" {cell} |" for cell in cells)


def header(timed: bool, flops: bool) -> str:
    names = ["N", "mode", "mesh", "params MiB", "opt state MiB", "state MiB", "replicated MiB",
             "largest replicated", "args (XLA) MiB", "temp (XLA) MiB",
             *(["GFLOP (XLA)"] if flops else []), *[f"{k} (MiB)" for k in COLLECTIVES], "in loss (MiB)"]
    if timed:
        names.append("step s (fake devices, shared cores)")
    align = ["---:", "---", "---"] + ["---:"] * 4 + ["---"] + ["---:"] * (len(names) - 8)
    return "| " + " | ".join(names) + " |\n|" + "|".join(align) + "|"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/clip.py:B/32")
    parser.add_argument("--batch", type=int, default=256,
                        help="global batch, the same on every mesh (divisible by 8)")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8],
                        choices=[1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no_scan", action="store_true",
                        help="keep the recipe's layer stacks unrolled (slower to compile)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. text.max_len=32")
    parser.add_argument("--time", action="store_true",
                        help="also run the step on real arrays (meant for demo configs; see "
                             "the docstring for why these times say little)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps with --time")
    parser.add_argument("--hlo_dir", help="write each compiled step's HLO text here")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    steps = args.steps if args.time else None
    print(f"{args.config}, global batch {args.batch}; {jax.device_count()} fake "
          f"{jax.devices()[0].platform} devices on {os.cpu_count()} cores ({cpu_name()}), "
          f"jax {jax.__version__}; collectives as executions per step (MiB)", flush=True)
    rows = []
    for n in args.devices:
        for mode in args.modes:
            if mesh_of(mode, n) is None:
                continue
            began = time.perf_counter()
            row = measure(args.config, mode, n, args.batch, not args.no_scan, settings, steps,
                          args.hlo_dir)
            rows.append(row)
            print(f"  {n} device(s), {row['mode']}: "
                  f"{'n/a' if 'error' in row else 'compiled in %.1f s' % row['compile_s']} "
                  f"({time.perf_counter() - began:.1f} s in all)", file=sys.stderr, flush=True)
    first = next((r for r in rows if "error" not in r), None)
    if first:
        print(f"\nParameters: {first['param_count']:,} ({first['param_bytes'] / MiB:,.1f} MiB)")
        loops = {r["collectives"]["unknown_trips"] for r in rows if "error" not in r}
        if loops - {0}:
            print("Note: some while loops have no known trip count; their collectives count once.")
        if not any(_flops_known(r) for r in rows):
            print("GFLOP left out: XLA's cost analysis counts a loop's body once, and these "
                  "steps scan their layers (--no_scan shows it).")
    flops = any(_flops_known(r) for r in rows)
    print()
    print(header(steps is not None, flops))
    for row in rows:
        print(format_row(row, steps is not None, flops))


if __name__ == "__main__":
    main()
