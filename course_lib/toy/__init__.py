"""The toy CNSD: the course's exact topology, small, trained on coloured shapes it draws itself (issue #18).

Chapter 1 introduces it: ``load_toy()`` and ``toy_tokenizer()`` give a model whose canny2image output
follows the hint's edges and the prompt's colours, on a CPU, in seconds::

    from course_lib.toy import load_toy, toy_tokenizer, evaluate_pipeline
    pipe = Canny2Image.from_torch(load_toy(), toy_tokenizer())
    print(evaluate_pipeline(pipe, "fp32", n=16))

Modules: data (scenes, prompts, hints), vae_encoder (the half of the VAE the course never needed),
train (the three stages), make (the ``train-toy`` command), weights (checkpoint layout, loading),
metrics (edge F1, colour read-back), evaluate (a pipeline over held-out scenes), quality (chapters 3 and 5:
fp32, FP16 and INT8 ONNX pipelines on the same scenes, images against images).
"""
from course_lib.toy.evaluate import TARGETS, ToyScore, evaluate_pipeline, evaluation_table
from course_lib.toy.weights import TOY_CARD, TOY_WEIGHTS, load_toy, toy_tokenizer, weights_status

__all__ = ["TARGETS", "TOY_CARD", "TOY_WEIGHTS", "ToyScore", "evaluate_pipeline", "evaluation_table", "load_toy",
           "toy_tokenizer", "weights_status"]
