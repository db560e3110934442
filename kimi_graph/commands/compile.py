"""`kimi-graph compile MODEL --target sm_80,sm_90 --out DIR`: generate every Triton kernel the
model needs, compile it for each target (no GPU needed) and write sources, binaries and a
manifest (kernel, target, config, source hash, triton version)."""
from __future__ import annotations

from .output import add_experts_option


def add_arguments(p):
    p.add_argument("model", help="model directory (config.json) or preset name")
    p.add_argument("--target", default="sm_80,sm_90", help="comma-separated targets (sm_80, sm_89, sm_90)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--pipeline", default="default", help="pass pipeline before lowering ('none': as declared)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    add_experts_option(p)
    p.add_argument("--tuning", help="a per-device tuning file (from the autotuner) to apply and ship")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="replace a previous build in --out (removes only the files it wrote)")


def owned(path):
    """What a previous build wrote into `path`: its manifest, sources, per-target folders and
    tuning file."""
    import json
    names = ["manifest.json", "src"]
    try:
        man = json.loads((path / "manifest.json").read_text())
        names += list(man.get("targets", [])) + ([man["tuning"]] if man.get("tuning") else [])
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return [str(n) for n in names]


def run(args) -> int:
    from collections import Counter

    from ..api import experts_pipeline
    from ..lowering.triton.aot import compile_model
    from ..lowering.triton.targets import parse_targets
    from .output import output_dir
    targets = parse_targets(args.target)
    output_dir(args.out, args.force, owned)
    pipeline = experts_pipeline(None if args.pipeline in ("", "none") else args.pipeline, args.experts)
    m = compile_model(args.model, targets, args.out, pipeline=pipeline, dtype=args.dtype, tuning=args.tuning,
                      log=(lambda *_: None) if args.quiet else print)
    per_target = Counter(e["target"] for e in m["kernels"])
    print(f"{len(m['kernels'])} kernel binaries in {args.out} ("
          + ", ".join(f"{per_target[t]} for {t}" for t in targets)
          + f"; {len({e['kernel'] for e in m['kernels']})} distinct kernels), triton {m['triton_version']}")
    return 0
