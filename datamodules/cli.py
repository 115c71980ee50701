"""``gmpi data synthetic|ffhq|eg3d|folder ...``: posed-image shards + dataset.json + preview.png. A subcommand of
``gmpi`` that lives here, beside the converters (``gmpi_lightning.cli`` names it, it does not import it)."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gmpi data", description="Write WebDataset shards of posed images + a "
                                "dataset card (dataset.json) and a preview grid.")
    sub = p.add_subparsers(dest="kind", required=True)

    def common(q, preset):
        q.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
        q.add_argument("--preset", default=preset, help="camera/plane preset of the data")
        q.add_argument("--resolution", type=int, help="expected image size (default: the first image's)")
        q.add_argument("--skip-bad", action="store_true", help="skip bad inputs, listing them in rejected.jsonl")
        q.add_argument("--overwrite", action="store_true")
        q.add_argument("--workers", type=int, default=2, help="parallel decode/encode processes (0: inline)")
        q.add_argument("--samples-per-shard", type=int, default=1000)

    q = sub.add_parser("ffhq", help="FFHQ/MetFaces: dataset-tool zip or folder + Deep3DFaceRecon .mat poses")
    q.add_argument("--images", required=True, help="ffhqRxR.zip (StyleGAN2 dataset_tool) or an image folder")
    q.add_argument("--poses", required=True, help="folder of Deep3DFaceRecon coefficient .mat files")
    q.add_argument("--fail-list", help="fail_list.txt: images without a pose estimate (excluded, counted)")
    q.add_argument("--xflip", action="store_true", help="also write mirrored copies with mirrored poses")
    common(q, "FFHQ256")
    q = sub.add_parser("eg3d", help="EG3D-processed folder/zip with dataset.json labels (AFHQv2-Cat)")
    q.add_argument("--root", required=True)
    common(q, "AFHQCat")
    q = sub.add_parser("folder", help="any image folder + poses.json/csv (yaw/pitch or c2w per file)")
    q.add_argument("--images", required=True)
    q.add_argument("--poses", required=True)
    common(q, "FFHQ256")
    q = sub.add_parser("synthetic", help="procedural heads with ground-truth depth and mask")
    q.add_argument("--out", required=True)
    q.add_argument("--num", type=int, default=10000)
    q.add_argument("--resolution", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--supersample", type=int, default=2)
    q.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from . import converters as cv

    if args.kind == "synthetic":
        out = cv.convert_synthetic(args.out, args.num, args.resolution, args.seed, args.supersample, args.overwrite)
    else:
        kw = dict(preset=args.preset, resolution=args.resolution, skip_bad=args.skip_bad, overwrite=args.overwrite,
                  workers=args.workers, samples_per_shard=args.samples_per_shard)
        if args.kind == "ffhq":
            out = cv.convert_ffhq(args.images, args.poses, args.out, fail_list=args.fail_list, xflip=args.xflip, **kw)
        elif args.kind == "eg3d":
            out = cv.convert_eg3d(args.root, args.out, **kw)
        else:
            out = cv.convert_folder(args.images, args.poses, args.out, **kw)
    print(f"preview: {cv.write_preview(out)}")
    return 0
