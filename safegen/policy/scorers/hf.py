"""`hf`: any transformers sequence-classification model, by hub id or local folder.

Options:
  model:       hub id (e.g. s-nlp/roberta_toxicity_classifier) or local folder (relative to the policy file)
  revision:    hub branch, tag or commit (pin it for reproducible scores)
  labels:      the label(s) that mean toxic: names from config.id2label, or integer indexes
  activation:  softmax | sigmoid (default: sigmoid for multi-label or single-logit models, else softmax)
  batch_size:  texts per forward pass (default 32)
  max_length:  tokens kept per text; longer texts are truncated (default 512)
  device:      cpu | cuda | cuda:N | mps | auto (default cpu)

Blame (which words it objects to) is by occlusion: each word's drop in the score's logit when it is
removed, which scores the text and one variant per word, a call of (1 + words) texts.
Labels are reported under the names written in the policy (an index 1 is reported as "1").
Remote code is never run (trust_remote_code=False): only architectures transformers ships load.
A local model's config.json is read when the policy loads, so a wrong label fails early; a hub
model's config is only fetched at the first `score` call.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import (Options, OptionError, Scorer, device_option, occlusion_blame, occlusion_cost,
                   resolve_device)


def _label_index(label: str | int, id2label: dict[int, str], key) -> int:
    if isinstance(label, int):
        if not 0 <= label < len(id2label):
            raise OptionError(key, f"label index {label} out of range: the model has {len(id2label)} labels")
        return label
    names = {name: i for i, name in id2label.items()}
    if label not in names:
        listed = ", ".join(f"{i}: {n}" for i, n in sorted(id2label.items()))
        raise OptionError(key, f"the model has no label {label!r}; its labels: {listed}")
    return names[label]


def _default_activation(config: dict) -> str:
    # Multi-label heads (e.g. unitary/unbiased-toxic-roberta) are trained with per-label BCE, so
    # sigmoid; single-label heads (s-nlp/roberta_toxicity_classifier) with cross-entropy, so softmax.
    if config.get("problem_type") == "multi_label_classification" or len(config["id2label"]) == 1:
        return "sigmoid"
    return "softmax"


class HFScorer(Scorer):
    name = "hf"
    requires = (("torch", "torch", "pip install torch"), ("transformers", "transformers", "pip install transformers"))
    path_or_hub_options = ("model",)

    def __init__(self, model: str, labels: list[str | int], activation: str | None = None,
                 revision: str | None = None, batch_size: int = 32, max_length: int = 512,
                 device: str = "cpu"):
        self.model_name = model
        self.label_keys = list(labels)
        self.labels = tuple(str(label) for label in labels)
        self.activation = activation
        self.revision = revision
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model = None
        self._tokenizer = None
        self._columns: list[int] = []

    @classmethod
    def from_options(cls, options) -> "HFScorer":
        opts = Options(options)
        model = opts.string("model", required=True)
        revision = opts.string("revision")
        labels = opts.raw("labels")
        activation = opts.string("activation", choices=("softmax", "sigmoid"))
        batch_size = opts.integer("batch_size", 32)
        max_length = opts.integer("max_length", 512)
        device = device_option(opts)
        opts.done()
        if labels is None:
            raise OptionError("labels", "is required: name the label(s) that mean toxic")
        if isinstance(labels, (str, int)) and not isinstance(labels, bool):
            labels = [labels]
        if not isinstance(labels, list) or not labels:
            raise OptionError("labels", "must be a label name, an index, or a non-empty list of them")
        for i, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise OptionError(("labels", i), f"must be a label name or an integer index, got {label!r}")
        if len({str(label) for label in labels}) != len(labels):
            raise OptionError("labels", "lists a label twice")
        scorer = cls(model, labels, activation, revision, batch_size, max_length, device)
        local_config = Path(model).expanduser() / "config.json"
        if Path(model).expanduser().is_dir():
            if not local_config.is_file():
                raise OptionError("model", f"folder {model} has no config.json")
            scorer._check_config(json.loads(local_config.read_text(encoding="utf-8")))
        elif model.startswith(("/", "./", "../", "~")):
            raise OptionError("model", f"folder not found: {model}")
        return scorer

    def _check_config(self, config: dict) -> None:
        """Resolve labels to output columns and fix the activation, from the model's config dict."""
        id2label = {int(i): name for i, name in (config.get("id2label") or {}).items()}
        if not id2label:
            raise OptionError("model", f"{self.model_name} is not a classifier: its config has no id2label")
        config = dict(config, id2label=id2label)
        self._columns = [_label_index(label, id2label, ("labels", i)) for i, label in enumerate(self.label_keys)]
        if self.activation is None:
            self.activation = _default_activation(config)
        if self.activation == "softmax" and len(id2label) == 1:
            raise OptionError("activation", "softmax over a single logit is always 1; use sigmoid")

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        kwargs = dict(revision=self.revision, trust_remote_code=False)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_name, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(self.model_name, **kwargs)
        self._check_config(model.config.to_dict())
        self._model = model.to(resolve_device(self.device)).eval()
        self._torch = torch

    def score(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self._model is None:
            self._load()
        torch = self._torch
        rows = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            inputs = self._tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length).to(self._model.device)
            with torch.inference_mode():
                logits = self._model(**inputs).logits.float()
            probs = logits.softmax(-1) if self.activation == "softmax" else logits.sigmoid()
            rows.append(probs[:, self._columns].cpu().numpy())
        table = np.concatenate(rows) if rows else np.zeros((0, len(self.labels)))
        return {label: table[:, j].astype(np.float64) for j, label in enumerate(self.labels)}

    def blame(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        return occlusion_blame(self, texts)

    def blame_cost(self, texts: list[str]) -> int:
        return occlusion_cost(texts)
