"""`detoxify`: the Detoxify classifiers (Hanu & Unitary team, 2020), multi-label, sigmoid outputs.

Options:
  variant:    original | unbiased | multilingual | original-small | unbiased-small (default original)
  checkpoint: path to a Detoxify checkpoint file instead of a released variant
  huggingface_config_path: local folder with the base model's config.json and tokenizer files
  labels:     labels that count (default: all the variant's toxicity labels; `toxicity` for a checkpoint)
  device:     cpu | cuda | cuda:N | mps | auto (default cpu)
  batch_size: texts per forward pass (default 32)

Blame (which words it objects to) is by occlusion: each word's drop in the score's logit when it is
removed, which scores the text and one variant per word, a call of (1 + words) texts.

A released variant is downloaded (torch hub cache) at the first `score` call, not when the policy is
loaded. Offline, Detoxify needs both local paths: the checkpoint, and `huggingface_config_path` for
the model and tokenizer files. It still builds a base config from the checkpoint's
`config.arch.args.model_type`, so that must be a hub id already in the local cache or a local
folder for a checkpoint to load with no network.

SECURITY: a Detoxify checkpoint is a pickle, read with `torch.load(weights_only=False)`, which can
run arbitrary code. Only the path written in the policy is ever loaded; point it at files you trust.
"""
from __future__ import annotations

import numpy as np

from .base import (Options, OptionError, Scorer, device_option, occlusion_blame, occlusion_cost,
                   resolve_device)

# Toxicity labels of each released model, after Detoxify's renaming (toxic -> toxicity,
# severe_toxic -> severe_toxicity, identity_hate -> identity_attack). The unbiased models also
# output identity *mentions* (male, muslim, ...), which are not toxicity and so are not offered.
JIGSAW_2018 = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
JIGSAW_2019 = ("toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat",
               "sexual_explicit")
VARIANT_LABELS = {
    "original": JIGSAW_2018,
    "original-small": JIGSAW_2018,
    "unbiased": JIGSAW_2019,
    "unbiased-small": JIGSAW_2019,
    "multilingual": JIGSAW_2019,
}
# Every Detoxify checkpoint has the headline label; the others depend on the training data.
CHECKPOINT_DEFAULT_LABELS = ("toxicity",)


class DetoxifyScorer(Scorer):
    name = "detoxify"
    requires = (("detoxify", "detoxify", "pip install detoxify"),)
    path_options = ("checkpoint", "huggingface_config_path")

    def __init__(self, variant: str | None = "original", checkpoint=None, huggingface_config_path=None,
                 labels=None, device: str = "cpu", batch_size: int = 32):
        self.variant = variant
        self.checkpoint = checkpoint
        self.huggingface_config_path = huggingface_config_path
        default = CHECKPOINT_DEFAULT_LABELS if checkpoint is not None else VARIANT_LABELS[variant]
        self.labels = tuple(labels) if labels else default
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @classmethod
    def from_options(cls, options) -> "DetoxifyScorer":
        opts = Options(options)
        has_variant = "variant" in opts
        variant = opts.string("variant", "original", choices=VARIANT_LABELS)
        checkpoint = opts.path("checkpoint", kind="file")
        config_path = opts.path("huggingface_config_path", kind="dir")
        labels = opts.string_list("labels")
        device = device_option(opts)
        batch_size = opts.integer("batch_size", 32)
        opts.done()
        if checkpoint is not None and has_variant:
            # Detoxify ignores the variant when given a checkpoint; saying both is a mistake.
            raise OptionError("checkpoint", "give either `variant` or `checkpoint`, not both")
        if labels is not None and not labels:
            raise OptionError("labels", "must list at least one label")
        if labels and checkpoint is None:
            known = VARIANT_LABELS[variant]
            for i, label in enumerate(labels):
                if label not in known:
                    raise OptionError(("labels", i), f"{variant!r} has no label {label!r}; "
                                      f"its labels: {', '.join(known)}")
        return cls(variant=None if checkpoint is not None else variant, checkpoint=checkpoint,
                   huggingface_config_path=config_path, labels=labels, device=device,
                   batch_size=batch_size)

    def _load(self):
        from detoxify import Detoxify

        model = Detoxify(
            model_type=self.variant or "original",
            checkpoint=None if self.checkpoint is None else str(self.checkpoint),
            device=resolve_device(self.device),
            huggingface_config_path=None if self.huggingface_config_path is None
            else str(self.huggingface_config_path),
        )
        missing = [label for label in self.labels if label not in model.class_names]
        if missing:
            # Only reachable for checkpoints: the variants' labels were checked at load time.
            raise OptionError("labels", f"checkpoint {self.checkpoint} has no label "
                              f"{missing[0]!r}; its labels: {', '.join(model.class_names)}")
        return model

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._model is None:
            self._model = self._load()
        out = {label: np.zeros(len(texts)) for label in self.labels}
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            predicted = self._model.predict(chunk)
            for label in self.labels:
                # predict() squeezes a one-text batch to a bare float.
                out[label][start:start + len(chunk)] = np.atleast_1d(np.asarray(predicted[label]))
        return out

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        return occlusion_blame(self, texts)

    def blame_cost(self, texts: list[str]) -> int:
        return occlusion_cost(texts)
