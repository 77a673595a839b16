# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# The virtualenv gets the CPU build of torch first (TORCH below), so nothing pulls a CUDA build;
# on a GPU machine set TORCH=torch (or install safegen with plain pip) for the normal build.
# Every package comes at the version in constraints.txt, the set the tests passed with: a new
# machine gets what the last one tested, not whatever is newest that day.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# The toxic_lstm scorer's weights and tokenizer, without its dependencies (TensorFlow among them),
# which safegen does not need: the scorer runs the network in torch.
TOXIC_LSTM := toxic-comment-classifier==0.3.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-mdlm test bench-smoke clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(TOXIC_LSTM)"
	touch $(STAMP)

install: $(STAMP)

# Detoxify a shipped prompt file with the TINY RANDOM offline model and the offline policy.
demo: $(STAMP)
	@echo "NOTE: the demo model is a TINY RANDOMLY INITIALISED LLaDA-shaped model: its texts are random words."
	$(PY) -m safegen tiny-model runs/tiny-model
	$(PY) -m safegen detoxify examples/prompts.txt -o runs/demo.jsonl \
		--model runs/tiny-model --quantization none --policy offline \
		--samples 2 --max-new-tokens 16 --steps 16 --block-length 16 --temperature 1.0 --seed 0
	@echo "Reports: runs/demo.jsonl (one JSON line per sample; rerunning resumes, finished samples are kept)"

# The same with a TINY RANDOM MDLM (MDLM-OWT's architecture) and MDLM's own sampler. The real model:
# --model kuleshov-group/mdlm-owt (with GPT-2's tokenizer from the hub; it runs on a CPU).
demo-mdlm: $(STAMP)
	@echo "NOTE: the demo model is a TINY RANDOMLY INITIALISED MDLM-shaped model: its texts are random words."
	$(PY) -m safegen tiny-model --family mdlm runs/tiny-mdlm
	$(PY) -m safegen detoxify examples/prompts.txt -o runs/demo-mdlm.jsonl \
		--model runs/tiny-mdlm --quantization none --policy offline \
		--samples 2 --max-new-tokens 16 --steps 64 --seed 0
	@echo "Reports: runs/demo-mdlm.jsonl (one JSON line per sample; rerunning resumes, finished samples are kept)"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
