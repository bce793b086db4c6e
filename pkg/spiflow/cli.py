"""``spiflow`` command line: run any stage alone, outside Snakemake.

    spiflow simulate  [--configfile FILE ...] [--results DIR]
    spiflow recon-truth | emc | selfsup | vae [--configfile ...]   # vae: after vae.orientations' stage
    spiflow mtip [--seeded]            # --seeded: start from recon/selfsup (method mtip_selfsup)
    spiflow phase    --method METHOD
    spiflow evaluate --method METHOD
    spiflow summary
    spiflow config                     # print the complete configuration
    spiflow import-cxi FILE.cxi [--patterns PATTERNS.zarr] # measured data -> patterns store
    spiflow import-euxfel              # the hits of the run euxfel.path -> patterns store, hits.csv/png
    spiflow export-cxi FILE.cxi [--patterns PATTERNS.zarr]
    spiflow export-dragonfly --photons photons.emc --detector det.dat [--patterns ...]
    spiflow ae3d-phase --intensity VOLUME --checkpoint CKPT --out DENSITY [--refine N | --refine-algorithm RAAR/ER]
                                       # MRC/.npy intensity -> DENSITY.zarr, DENSITY_{amplitude,phase}.mrc

Paths follow docs/conventions.md (``spiflow.rules.layout``), so files written here are the same
ones Snakemake writes and reads: a stage run by hand can be picked up by the workflow.
Each stage gets the config keys its Snakemake rule declares (``spiflow.rules.stage_config``).
The default configuration is the package schema's (= config/config.yaml).
"""
from __future__ import annotations

import argparse
import logging
import sys

import yaml

from . import pipeline
from .config import load_config
from .rules import layout, measured_source, stage_config, vae_orientations_source


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spiflow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for name, help_ in [("simulate", "simulate patterns and ground truth"),
                        ("recon-truth", "write the truth oracle as a reconstruction"),
                        ("emc", "orient with EMC and merge the 3D intensity"),
                        ("mtip", "orient with M-TIP (merging and phasing in the loop)"),
                        ("selfsup", "train the self-supervised encoders and intensity decoder"),
                        ("vae", "train the heterogeneity VAE at the orientations of vae.orientations"),
                        ("phase", "phase one method's intensity"),
                        ("evaluate", "evaluate one method against the truth"),
                        ("summary", "write evaluate/summary.csv and overview plots"),
                        ("import-euxfel", "the hits of the European XFEL run euxfel.path as the patterns store"),
                        ("config", "print the complete, validated configuration")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--configfile", nargs="*", default=[], help="YAML files, later ones win")
        s.add_argument("--results", default="results", help="results directory (default: results)")
        s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("phase", "evaluate"):
            s.add_argument("--method", required=True, help="truth, emc, ...")
        if name == "mtip":
            s.add_argument("--seeded", action="store_true", help="start from the selfsup orientations")
    _format_parsers(sub)
    s = sub.add_parser("ae3d-phase", help="phase an intensity volume (MRC or .npy) with a trained ae3d network")
    s.add_argument("--intensity", required=True, help="intensity volume: .mrc/.map or .npy, cubic, non-negative")
    s.add_argument("--checkpoint", required=True, help="ae3d checkpoint (.pt)")
    s.add_argument("--out", required=True, help="output prefix: OUT.zarr, OUT_amplitude.mrc, OUT_phase.mrc")
    s.add_argument("--refine", type=int, default=0, help="ER iterations after the network (default 0)")
    s.add_argument("--refine-algorithm", default=None,
                   help="instead of --refine: one cycle of this iterative phasing with shrinkwrap after the network, "
                        "a key of spiflow.ae3d.ITERATIVE_BASELINES (RAAR/ER: the best measured refinement; HIO/ER)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def _format_parsers(sub) -> None:
    """Subcommands of :mod:`spiflow.formats`; the patterns store defaults to the run's."""
    for name, help_ in [("import-cxi", "convert a CXI file into the run's patterns store"),
                        ("export-cxi", "write the run's patterns store as a CXI file"),
                        ("export-dragonfly", "write the patterns as Dragonfly photons + detector files")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--configfile", nargs="*", default=[], help="YAML files, later ones win")
        s.add_argument("--results", default="results", help="results directory (default: results)")
        s.add_argument("--patterns", default=None, help="patterns store (default: the run's simulate/patterns.zarr)")
        s.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
        s.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
        if name == "export-dragonfly":
            s.add_argument("--photons", required=True, help="output photons (.emc) file")
            s.add_argument("--detector", required=True, help="output ASCII detector file")
            s.add_argument("--ewald-rad", type=float, default=None, help="Ewald radius in voxels")
        else:
            s.add_argument("cxi", help="CXI file")
        if name == "import-cxi":
            s.add_argument("--photon-energy-ev", type=float, default=None, help="override the file's energy")
            s.add_argument("--polarization", choices=["x", "y", "unpolarized"], default=None)
            s.add_argument("--fluence", type=float, default=None, help="photons per Å² if known")
            s.add_argument("--round-counts", action="store_true", help="round non-integer counts")


def _run_format(args, config: dict, patterns: str) -> int:
    """Run one :mod:`spiflow.formats` subcommand; exit status as :func:`main`."""
    from . import formats

    patterns = args.patterns or patterns
    try:
        if args.stage == "import-cxi":
            out = formats.import_cxi(args.cxi, patterns, photon_energy_ev=args.photon_energy_ev,
                                     polarization=args.polarization, fluence_photons_per_angstrom2=args.fluence,
                                     grid_oversampling=config["reconstruction"]["grid_oversampling"],
                                     round_counts=args.round_counts, chunk_frames=config["dataset"]["chunk_frames"])
            print(f"spiflow import-cxi: {out['frames']} frames {out['shape']} -> {patterns}")
        elif args.stage == "export-cxi":
            formats.export_cxi(patterns, args.cxi)
        else:
            formats.export_dragonfly(patterns, args.photons, args.detector, ewald_rad=args.ewald_rad)
    except (FileNotFoundError, ValueError) as exc:
        print(f"spiflow {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_ae3d_phase(args) -> int:
    """``spiflow ae3d-phase`` (:func:`spiflow.ae3d.phase_volume`); exit status as :func:`main`."""
    from . import ae3d

    pipeline.configure_threads(args.threads)
    try:
        paths = ae3d.phase_volume(args.intensity, args.checkpoint, args.out, refine_iterations=args.refine,
                                    refine_algorithm=args.refine_algorithm)
    except (FileNotFoundError, ValueError) as exc:
        print(f"spiflow ae3d-phase: {exc}", file=sys.stderr)
        return 1
    print("spiflow ae3d-phase: wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


FORMAT_STAGES = ("import-cxi", "export-cxi", "export-dragonfly")
# the Snakemake rule of each stage, whose config keys it gets (evaluate --method vae: evaluate_vae)
RULES = {"simulate": "simulate", "recon-truth": "recon_truth", "emc": "orient_emc", "mtip": "orient_mtip",
         "selfsup": "train_selfsup", "vae": "train_vae", "phase": "phase", "evaluate": "evaluate", "summary": "summary",
         "import-euxfel": "import_euxfel"}


def main(argv: list[str] | None = None) -> int:
    """Run one stage; returns the exit status: 0 done, 1 the stage failed on bad input
    (the message names the file), 2 a bad configuration or option (it names the key)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.stage == "ae3d-phase":
        return _run_ae3d_phase(args)
    try:
        config = load_config(*args.configfile)
    except (FileNotFoundError, ValueError) as exc:
        print(f"spiflow: {exc}", file=sys.stderr)
        return 2
    if args.stage == "config":
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    pipeline.configure_threads(args.threads)
    pipeline.stop_on_sigterm()
    P = layout(args.results, config["run"])
    progress = not args.quiet
    method = getattr(args, "method", None)
    if method is not None and method not in config["reconstruction"]["methods"]:
        print(f"spiflow: --method {method!r} is not in reconstruction.methods "
              f"{config['reconstruction']['methods']}", file=sys.stderr)
        return 2
    if args.stage in FORMAT_STAGES:
        return _run_format(args, stage_config(config, "import_cxi"), P["patterns"])
    f = {k: v.format(method=method, plot="{plot}", shard="{shard}", half="{half}") for k, v in P.items()}
    c = stage_config(config, "evaluate_vae" if method == "vae" and args.stage == "evaluate" else RULES[args.stage])
    try:
        if args.stage == "simulate":
            pipeline.stage_simulate(c, f["patterns"], f["truth"], progress=progress)
        elif args.stage == "import-euxfel":
            pipeline.stage_import_euxfel(c, f["patterns"], f["hits_csv"], f["hits_png"])
        elif args.stage == "recon-truth":
            pipeline.stage_recon_truth(c, f["truth"], f["patterns"], P["intensity"].format(method="truth"),
                                       P["orientations"].format(method="truth"))
        elif args.stage == "emc":
            pipeline.stage_emc(c, f["patterns"], P["intensity"].format(method="emc"),
                               P["orientations"].format(method="emc"), f["emc_log"], f["emc_checkpoint"],
                               progress=progress)
        elif args.stage == "mtip":
            m = "mtip_selfsup" if args.seeded else "mtip"
            pipeline.stage_mtip(c, f["patterns"], P["intensity"].format(method=m),
                                P["orientations"].format(method=m), P["recon_log"].format(method=m),
                                P["recon_checkpoint"].format(method=m),
                                prior=P["orientations"].format(method="selfsup") if args.seeded else None,
                                progress=progress)
        elif args.stage == "selfsup":
            pipeline.stage_selfsup(c, f["patterns"], P["intensity"].format(method="selfsup"),
                                   P["orientations"].format(method="selfsup"), P["recon_log"].format(method="selfsup"),
                                   P["recon_checkpoint"].format(method="selfsup"), progress=progress)
        elif args.stage == "vae":
            pipeline.stage_vae(c, f["patterns"], vae_orientations_source(config, P),
                               P["intensity"].format(method="vae"), P["orientations"].format(method="vae"),
                               f["latent"], P["recon_log"].format(method="vae"),
                               P["recon_checkpoint"].format(method="vae"), f["vae_decoder"], progress=progress)
        elif args.stage == "phase":
            pipeline.stage_phase(c, f["intensity"], f["density"], f["density_mrc"], f["phase_log"])
        elif args.stage == "evaluate":
            vae = method == "vae"
            truth = None if measured_source(config) else f["truth"]  # measured data: no truth
            pipeline.stage_evaluate(c, method, truth, f["patterns"], f["intensity"],
                                    f["orientations"], f["density"], f["eval_dir"],
                                    latent=f["latent"] if vae else None, decoder=f["vae_decoder"] if vae else None)
        elif args.stage == "summary":
            methods = config["reconstruction"]["methods"]
            pipeline.stage_summary(c, [P["metrics"].format(method=m) for m in methods],
                                   [] if measured_source(config) else [P["fsc"].format(method=m) for m in methods],
                                   f["patterns"], f["summary"],
                                   f["emc_log"] if "emc" in methods else None)
    except (FileNotFoundError, ValueError) as exc:
        print(f"spiflow {args.stage}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
