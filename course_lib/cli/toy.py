"""The toy commands (issue #18): train-toy (train, save, evaluate the small CNSD that follows the edges)."""
from __future__ import annotations

import sys

from course_lib.cli.args import (check_device, ddim_steps, device, fraction, nonneg_int, out_folder, positive_float,
                                 positive_int, seed_int)
from course_lib.cli.common import say


def cmd_train_toy(args) -> int:
    from course_lib.toy.make import train_toy
    from course_lib.toy.train import RECIPES

    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe {args.recipe!r}: expected one of {sorted(RECIPES)}")
    check_device(args.device)
    overrides = {k: v for k, v in (("batch", args.batch), ("vae_steps", args.vae_steps),
                                   ("unet_steps", args.unet_steps), ("control_steps", args.control_steps),
                                   ("pool", args.pool)) if v is not None}
    card = train_toy(args.out, device=args.device, recipe=args.recipe, budget_s=args.budget_s, eval_n=args.eval_n,
                     eval_steps=args.eval_steps, eval_share=args.eval_share, seed=args.seed, progress=not args.quiet,
                     command="python -m course_lib " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train-toy"]
                     else None, **overrides)
    say(f"wrote {args.out}: cnsd_toy.safetensors, cnsd_toy.json, evaluation.json, loss_curve.png, samples.png")
    return 0 if card["meets_targets"] or args.recipe == "smoke" else 1


def add_commands(sub) -> None:
    """Register train-toy."""
    t = sub.add_parser("train-toy", help="train the toy CNSD on generated shapes (VAE, UNet+CLIP, ControlNet), "
                                         "save it in the checkpoint layout, evaluate it (issue #18)")
    t.add_argument("--out", required=True, type=out_folder, help="folder for the weights, card, loss curve, samples, evaluation")
    t.add_argument("--device", default="cuda", type=device, help="cuda (minutes) or cpu (hours; recipe cpu)")
    t.add_argument("--recipe", default="gpu", help="gpu (batch 256, budget-bound), cpu (batch 32, ~2 h on 2 cores) "
                                                    "or smoke (seconds)")
    t.add_argument("--budget-s", type=positive_float, help="wall-clock seconds for the whole command: data, the three stages, "
                                                  "saving, evaluation (default: no limit, every planned step)")
    t.add_argument("--eval-share", type=fraction, default=0.2, help="share of --budget-s kept for the evaluation")
    t.add_argument("--batch", type=positive_int, help="training batch (default: the recipe's)")
    t.add_argument("--vae-steps", type=nonneg_int, help="VAE training steps (default: the recipe's)")
    t.add_argument("--unet-steps", type=nonneg_int, help="UNet+CLIP training steps (default: the recipe's)")
    t.add_argument("--control-steps", type=nonneg_int, help="ControlNet training steps (default: the recipe's)")
    t.add_argument("--pool", type=positive_int, help="scenes drawn once for training")
    t.add_argument("--eval-n", type=positive_int, default=64, help="held-out scenes in the evaluation (default 64)")
    t.add_argument("--eval-steps", type=ddim_steps, default=20, help="DDIM steps in the evaluation (default 20, CFG 9)")
    t.add_argument("--seed", type=seed_int, default=0, help="seed of the data and the initial weights")
    # CPU threads: the global option, python -m course_lib --threads N train-toy ... (a --threads here would
    # overwrite it: argparse lets a subcommand's default replace the main parser's value)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train_toy)
