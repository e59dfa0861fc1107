"""What the command groups share: printing, the CNSD model of a preset, its tokenizer."""
from __future__ import annotations


def say(msg: str) -> None:
    """Print one line now (progress of long commands must not wait for a buffer)."""
    print(msg, flush=True)


def load_model(config: str, checkpoint: str | None, seed: int = 0):
    """The CNSD model of a preset: the checkpoint's weights if given, else the toy's trained weights (``toy``),
    else seeded random weights."""
    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.cnsd.checkpoint import load_checkpoint

    if config == "toy" and not checkpoint:
        from course_lib.toy.weights import TOY_WEIGHTS, load_toy

        say(f"building CNSD (toy) and loading its trained weights ({TOY_WEIGHTS.name}, shipped with course_lib)")
        return load_toy()
    cfg = get_config(config)
    say(f"building CNSD ({config})" + (f" and loading {checkpoint}" if checkpoint else f", random weights (seed {seed})"))
    model = build_cnsd(cfg, seed=seed)
    if checkpoint:
        say(str(load_checkpoint(checkpoint, model)))
    return model


def make_tokenizer(config: str, vocab: str | None):
    """tiny runs offline on the byte-level tokenizer, toy on its compact variant (the one it was trained with);
    sd15 needs CLIP's real vocabulary (shipped with course_lib)."""
    from course_lib.cnsd.tokenizer import byte_level_tokenizer, get_tokenizer

    if vocab is None and config == "tiny":
        return byte_level_tokenizer()
    if vocab is None and config == "toy":
        return byte_level_tokenizer(compact=True)
    return get_tokenizer(vocab)


def add_tensorrt_option(parser) -> None:
    """``--tensorrt {auto,tensorrt,tensorrt_rtx}`` on a command that builds or runs plans (chapter 2)."""
    parser.add_argument("--tensorrt", choices=["auto", "tensorrt", "tensorrt_rtx"], default=None,
                        help="which TensorRT: full TensorRT, TensorRT for RTX (builds without a GPU), or auto "
                             "(full TensorRT first); default: $COURSE_TENSORRT, else auto")


def use_tensorrt(args) -> None:
    """Make ``--tensorrt`` the flavour of this process (course_lib.trt.flavour.select); None leaves the default."""
    if getattr(args, "tensorrt", None) is not None:
        from course_lib.trt.flavour import select

        select(args.tensorrt)
