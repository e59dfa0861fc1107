"""Homework commands: ``submit`` (students) and ``grade`` (instructors). See docs/instructors.md."""
from __future__ import annotations

import json
from pathlib import Path

from course_lib.cli.args import out_folder, positive_float, suffixed
from course_lib.cli.common import load_model, say
from course_lib.homework.safezip import MAX_MEMORY_MB, TIMEOUT_S, ZipLimits


def cmd_submit(args) -> int:
    """Homework: run the homework's checks here and write one zip of evidence."""
    from course_lib.homework.submit import check_seed, collect, sanitize_student_id, submit

    if args.checkpoint and args.config != "sd15":
        raise ValueError("--checkpoint: the tiny preset's reference is rebuilt from --seed; "
                         "a checkpoint goes with --config sd15")
    if args.config == "sd15" and not args.checkpoint and args.hw != "2":
        raise ValueError(f"--config sd15: homework {args.hw}'s tests compare your files with the real model; "
                         "give --checkpoint control_sd15_canny.pth (or .safetensors)")
    limits = _zip_limits(args)
    sanitize_student_id(args.student)              # the cheap checks first: sd15 takes minutes and GBs to load
    check_seed(args.seed)
    if args.out is not None and Path(args.out).suffix != ".zip":
        raise ValueError(f"--out {args.out}: expected a file name ending in .zip")
    collect(args.hw, args.work)
    reference = None
    if args.checkpoint and args.hw != "2":         # homework 2's tests need no reference
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file "
                                    "(expected control_sd15_canny.pth or .safetensors)")
        import torch                               # the real model, on the GPU where there is one (TF32 off there)
        reference = load_model("sd15", args.checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
    result = submit(args.hw, args.student, args.seed, work=args.work, out=args.out, config=args.config,
                    reference=reference, limits=limits, progress=not args.quiet)
    say(str(result))
    return 0 if result.passed else 1


def _zip_limits(args) -> ZipLimits:
    """submit / grade --max-members, --max-file-mb, --max-total-mb: the zip's size limits (each > 0)."""
    for name, value in (("--max-members", args.max_members), ("--max-file-mb", args.max_file_mb),
                        ("--max-total-mb", args.max_total_mb)):
        if not value > 0:
            raise ValueError(f"{name} {value:g}: expected a number > 0")
    return ZipLimits(args.max_members, args.max_file_mb, args.max_total_mb)


def _read_points(path: str | None) -> dict | None:
    """grade --points: a JSON object {test name: points}; checked against the tests by grade_folder."""
    if path is None:
        return None
    try:
        points = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--points {path}: {(e.strerror or str(e)).lower()}; expected a JSON file like "
                         '{"onnx_parity_unet": 4}') from None
    except UnicodeDecodeError:
        raise ValueError(f"--points {path}: not UTF-8 text; expected a JSON file like "
                         '{"onnx_parity_unet": 4}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--points {path}: not JSON ({e.msg} at line {e.lineno}); "
                         'expected an object like {"onnx_parity_unet": 4}') from None
    if not isinstance(points, dict):
        raise ValueError(f'--points {path}: expected a JSON object like {{"onnx_parity_unet": 4}}, '
                         f"got {type(points).__name__}")
    return points


def cmd_grade(args) -> int:
    """Homework: grade a folder of submission zips on a CPU machine."""
    from course_lib.homework.grade import grade_folder, read_roster, summary_row

    limits = _zip_limits(args)
    roster = read_roster(args.roster) if args.roster else None
    results = grade_folder(args.submissions, args.out, roster=roster, salt=args.salt, require_gpu=args.require_gpu,
                           points=_read_points(args.points), limits=limits, keep=args.keep,
                           timeout=args.timeout, max_memory_mb=args.max_memory_mb, progress=not args.quiet)
    for row in map(summary_row, results):
        say(f"{row['student'] or row['zip']:<20} hw {row['homework']}: {row['score']:g} / {row['max_score']:g}"
             f" ({row['status']})")
    say(f"wrote {Path(args.out) / 'summary.csv'}")
    return 0


def add_commands(sub) -> None:
    """Register submit and grade."""
    h = sub.add_parser("submit", help="homework: run its checks and write one zip (see docs/instructors.md)")
    h.add_argument("--hw", required=True, choices=["1", "2", "3", "int8"], help="which homework")
    h.add_argument("--student", required=True, help="your ID (letters, digits, '.', '_', '-')")
    h.add_argument("--seed", type=int, default=0, help="the seed your instructor issued")
    h.add_argument("--out", type=suffixed(".zip"), help="the zip to write (default: only run the checks and list the files)")
    h.add_argument("--work", default="homework", help="folder with hw1/, hw2/, hw3/, int8/ (default: homework)")
    h.add_argument("--config", choices=["tiny", "sd15"], default="tiny", help="the preset your hand-in was made on")
    h.add_argument("--checkpoint", help="sd15: control_sd15_canny.pth or .safetensors, the reference for the tests")

    g = sub.add_parser("grade", help="instructors: grade a folder of submission zips on a CPU machine")
    g.add_argument("submissions", help="folder of *.zip")
    g.add_argument("--out", required=True, type=out_folder, help="results folder: <student>/results.json and summary.csv")
    g.add_argument("--roster", help="CSV student,seed of the seeds you issued")
    g.add_argument("--salt", default="", help="a secret mixed into the seeds of the re-check inputs (default: none)")
    g.add_argument("--require-gpu", action="store_true", help="GPU evidence (engines) counts towards the score")
    g.add_argument("--points", help='JSON file {"test name": points, ...} overriding the default points')
    g.add_argument("--keep", action="store_true", help="keep each unpacked submission in <out>/<student>/files/")
    g.add_argument("--timeout", type=positive_float, default=TIMEOUT_S,
                   help="seconds one zip's grading may take (default %(default)g); over it, an error row")
    g.add_argument("--max-memory-mb", type=positive_float, default=MAX_MEMORY_MB,
                   help="MB of memory one zip's grading may allocate (default %(default)g); over it, an error row")
    for cmd in (h, g):
        cmd.add_argument("--max-members", type=int, default=ZipLimits.max_members,
                         help="files per zip (default %(default)s)")
        cmd.add_argument("--max-file-mb", type=float, default=ZipLimits.max_file_mb,
                         help="MB per file (default %(default)s)")
        cmd.add_argument("--max-total-mb", type=float, default=ZipLimits.max_total_mb,
                         help="MB unpacked per zip (default %(default)s)")
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    h.set_defaults(func=cmd_submit)
    g.set_defaults(func=cmd_grade)
