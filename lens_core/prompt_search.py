"""Training-free search for the reasoner's system prompt (the Lens paper's recipe).

Start from candidate system prompts, let the reasoner rewrite a fixed prompt set with each one,
generate an image per rewritten prompt, score the images against what the prompts asked for, keep
the best ``top_k`` candidates and ask the same LLM to write variations of them (a mutation
instruction as its system prompt, the parent prompt and its score as the request). After
``rounds`` rounds the best candidate wins; it is written atomically, and a table of every
candidate and its score is printed.

Everything that touches a model is a callable, so the loop runs with anything:

* ``rewrite(prompts, system_prompt) -> list[str]`` (:func:`reasoner_rewriter` wraps :func:`refine`);
* ``generate(prompts) -> list[PIL.Image]`` (the CLI builds it from :class:`LensPipeline`);
* ``score(images, specs) -> float``, higher is better (default: ToyEval's overall accuracy,
  ``training/toyeval.py``, imported only when used);
* ``mutate(candidate, index, context) -> str | None`` (:func:`reasoner_mutator`).

Command line: ``lens-prompt-search`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LensError, run_command
from .reasoner import (
    DEFAULT_SYSTEM_PROMPT_FILE,
    ReasonerBackend,
    ReasonerSettings,
    refine,
)

Rewriter = Callable[[list[str], str], list[str]]
ImageGenerator = Callable[[list[str]], list[Any]]
Scorer = Callable[[list[Any], list[dict]], float]
Mutator = Callable[["Candidate", int, "SearchContext"], "str | None"]

MUTATION_INSTRUCTION = """\
You edit the system prompt of an image-prompt rewriter. The rewriter receives a short image request \
and, guided by its system prompt, writes the detailed description that a text-to-image model draws. \
Images made from those descriptions are scored automatically on whether they show what the \
original request asked for: the right objects, the right number of each, their colours, and where \
they are relative to each other.

The user message holds the current system prompt and its score. Write an improved version that \
should raise the score. Change one or two things on purpose, for example: how exact counts are \
stated, how each object's colour is tied to that object, how positions are spelled out, how long \
the description should be, or what the rewriter must never add. Keep the rules that serve \
faithfulness to the request, keep it self-contained, and keep it under 350 words.

Reply with the new system prompt only, with no comment before or after it."""


class SearchError(LensError, ValueError):
    """Bad search inputs: no candidates, an unreadable file, a scorer that cannot run..."""


@dataclass
class Candidate:
    """A system prompt under test; ``score`` is None until evaluated."""

    name: str
    text: str
    origin: str = "given"
    round: int = 0
    score: float | None = None
    fallbacks: int = 0  # prompts the reasoner could not rewrite with this candidate
    example: str = ""  # its rewrite of the first prompt, for the report


@dataclass
class SearchContext:
    """What a mutator may want to know: the round and the best score so far."""

    round: int
    best_score: float


@dataclass
class SearchResult:
    """Every evaluated candidate, best first (ties keep the earlier one)."""

    candidates: list[Candidate] = field(default_factory=list)

    @property
    def winner(self) -> Candidate:
        return self.candidates[0]


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def evaluate_candidate(
    candidate: Candidate,
    specs: Sequence[dict],
    rewrite: Rewriter,
    generate: ImageGenerator,
    score: Scorer,
) -> float:
    """Rewrite every spec's prompt with ``candidate``, generate, score; stores and returns the score."""
    prompts = [s["prompt"] for s in specs]
    refined = rewrite(prompts, candidate.text)
    if len(refined) != len(prompts):
        raise SearchError(f"rewrite returned {len(refined)} prompts for {len(prompts)}")
    candidate.fallbacks = int(getattr(rewrite, "last_fallbacks", 0))
    candidate.example = refined[0] if refined else ""
    images = generate(list(refined))
    if len(images) != len(prompts):
        raise SearchError(f"generate returned {len(images)} images for {len(prompts)} prompts")
    value = float(score(list(images), list(specs)))
    candidate.score = value
    return value


def _ranked(candidates: Sequence[Candidate]) -> list[Candidate]:
    # sorted() is stable: equal scores keep their evaluation order.
    return sorted(candidates, key=lambda c: -(c.score if c.score is not None else float("-inf")))


def search(
    seeds: Sequence[Candidate],
    specs: Sequence[dict],
    rewrite: Rewriter,
    generate: ImageGenerator,
    score: Scorer,
    mutate: Mutator | None,
    rounds: int = 3,
    top_k: int = 2,
    mutations_per_parent: int = 2,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Evaluate ``seeds``, then for ``rounds`` rounds mutate the ``top_k`` best and evaluate the children.

    A child whose text is empty or repeats a candidate already seen (whitespace and case ignored)
    is skipped. Returns every evaluated candidate, best first.
    """
    if not seeds:
        raise SearchError("the search needs at least one candidate system prompt")
    if not specs:
        raise SearchError("the search needs at least one prompt to rewrite")
    if rounds < 0 or top_k < 1 or mutations_per_parent < 0:
        raise SearchError("rounds must be >= 0, top_k >= 1, mutations_per_parent >= 0")
    seen: set[str] = set()
    pool: list[Candidate] = []

    def run(candidate: Candidate) -> None:
        value = evaluate_candidate(candidate, specs, rewrite, generate, score)
        pool.append(candidate)
        note = f", {candidate.fallbacks} fallback(s)" if candidate.fallbacks else ""
        log(f"[round {candidate.round}] {candidate.name}: score {value:.4f}{note}")

    for seed in seeds:
        key = _normalised(seed.text)
        if not key or key in seen:
            log(f"skipping candidate {seed.name}: empty or a duplicate")
            continue
        seen.add(key)
        run(seed)
    if not pool:
        raise SearchError("every candidate system prompt was empty or a duplicate")

    for r in range(1, rounds + 1):
        if mutate is None or mutations_per_parent == 0:
            break
        parents = _ranked(pool)[:top_k]
        context = SearchContext(r, parents[0].score or 0.0)
        children: list[Candidate] = []
        for parent in parents:
            for i in range(mutations_per_parent):
                text = mutate(parent, i, context)
                key = _normalised(text or "")
                if not key or key in seen:
                    log(f"[round {r}] mutation {i} of {parent.name} gave nothing new; skipped")
                    continue
                seen.add(key)
                children.append(
                    Candidate(f"r{r}.{len(children)}", text.strip(), f"mutation {i} of {parent.name}", r)
                )
        if not children:
            log(f"[round {r}] no new candidates; stopping early")
            break
        for child in children:
            run(child)
    return SearchResult(_ranked(pool))


# ----------------------------------------------------------------------------------------------
# Reasoner-backed rewrite and mutation


class _ReasonerRewriter:
    """``rewrite(prompts, system_prompt)`` through :func:`refine`; counts fallbacks of the last call."""

    def __init__(self, settings: ReasonerSettings, backend: ReasonerBackend | None) -> None:
        self.settings = settings
        self.backend = backend
        self.last_fallbacks = 0

    def __call__(self, prompts: list[str], system_prompt: str) -> list[str]:
        s = dataclasses.replace(self.settings, system_prompt=system_prompt, system_prompt_file=None)
        out = refine(prompts, s, self.backend)
        self.last_fallbacks = sum(r.fell_back for r in out)
        return [r.text for r in out]


def reasoner_rewriter(settings: ReasonerSettings, backend: ReasonerBackend | None = None) -> Rewriter:
    """A rewriter that runs the reasoner with the candidate as its system prompt (``on_error`` as set)."""
    return _ReasonerRewriter(settings, backend)


def mutation_request(candidate: Candidate, context: SearchContext) -> str:
    """The user message of a mutation request: the parent prompt and how it scored."""
    return (
        f"Current system prompt (score {candidate.score:.4f}; best so far {context.best_score:.4f}; "
        f"round {context.round}):\n\n<<<\n{candidate.text}\n>>>"
    )


def reasoner_mutator(
    settings: ReasonerSettings,
    backend: ReasonerBackend | None = None,
    instruction: str = MUTATION_INSTRUCTION,
) -> Mutator:
    """Mutations written by the reasoner's own LLM: ``instruction`` as its system prompt.

    Each (round, parent, index) gets its own seed so the variations differ; a failed call yields
    None (the search skips it).
    """

    def mutate(candidate: Candidate, index: int, context: SearchContext) -> str | None:
        base = settings.seed if settings.seed is not None else 0
        seed = base + 7919 * context.round + 104729 * index + zlib.crc32(candidate.text.encode()) % 1000003
        s = dataclasses.replace(
            settings,
            system_prompt=instruction,
            system_prompt_file=None,
            seed=seed,
            on_error="passthrough",
        )
        request = mutation_request(candidate, context)
        (result,) = refine([request], s, backend)
        if result.fell_back:
            return None
        text = result.text.strip()
        if text.startswith("<<<"):
            text = text[3:]
        if text.endswith(">>>"):
            text = text[:-3]
        return text.strip() or None

    return mutate


def toyeval_score(images: list[Any], specs: list[dict]) -> float:
    """ToyEval's overall accuracy (``training/toyeval.py``); specs need ``kind`` and ``scene``."""
    try:
        toyeval = importlib.import_module("training.toyeval")
    except ImportError as e:
        raise SearchError(
            f"the default scorer needs training/toyeval.py, which cannot be imported ({e}); "
            "pass another scorer (--scorer module:function)"
        ) from e
    missing = [i for i, s in enumerate(specs) if "kind" not in s or "scene" not in s]
    if missing:
        raise SearchError(
            f"ToyEval needs 'kind' and 'scene' in every prompt entry (entry {missing[0]} lacks them); "
            "use --toy-prompts N, or pass another scorer"
        )
    return float(toyeval.evaluate(images, specs)["overall"])


# ----------------------------------------------------------------------------------------------
# Output


def format_table(result: SearchResult, width: int = 60) -> str:
    """One row per candidate, best first: rank, score, round, name, origin, start of the text."""
    rows = [f"{'rank':>4}  {'score':>8}  {'round':>5}  {'fallbk':>6}  {'name':<14} {'origin':<24} prompt"]
    for rank, c in enumerate(result.candidates, 1):
        text = " ".join(c.text.split())
        text = text if len(text) <= width else text[: width - 3] + "..."
        score = f"{c.score:.4f}" if c.score is not None else "-"
        rows.append(
            f"{rank:>4}  {score:>8}  {c.round:>5}  {c.fallbacks:>6}  {c.name:<14.14} {c.origin:<24.24} {text}"
        )
    return "\n".join(rows)


def save_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so the file appears complete or not at all (temp file in the folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def load_prompt_set(path: str | os.PathLike) -> list[dict]:
    """Prompt entries from a JSON list (strings or objects with ``prompt``), JSONL, or a text file
    (one prompt per line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SearchError(f"{path}: cannot read the prompt set ({e})") from e
    if path.suffix == ".json":
        try:
            items = json.loads(raw)
        except ValueError as e:
            raise SearchError(f"{path}: not valid JSON ({e})") from e
    elif path.suffix == ".jsonl":
        try:
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except ValueError as e:
            raise SearchError(f"{path}: not valid JSON lines ({e})") from e
    else:
        items = [line.strip() for line in raw.splitlines() if line.strip()]
    if not isinstance(items, list):
        raise SearchError(f"{path}: expected a list of prompts")
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise SearchError(f"{path}: entry {i} is neither a string nor an object with a 'prompt' string")
        specs.append(item)
    return specs


def load_scorer(spec: str | None) -> Scorer:
    """``module:function`` (imported), or None for ToyEval."""
    if not spec:
        return toyeval_score
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SearchError(f"--scorer must look like module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SearchError(f"cannot load scorer {spec!r}: {e}") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lens-prompt-search",
        description="Search the Lens reasoner's system prompt: rewrite, generate, score, mutate the best.",
    )
    p.add_argument("--candidates", nargs="*", default=[], help="text files, one candidate system prompt each")
    p.add_argument("--no-default", action="store_true", help="do not include the packaged system prompt")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompt set: .json list, .jsonl, or .txt (one prompt per line)")
    src.add_argument("--toy-prompts", type=int, default=None, help="use N ToyEval prompts (default 12)")
    p.add_argument("--toy-seed", type=int, default=0, help="seed of the ToyEval prompt set")
    p.add_argument("--scorer", help="module:function scoring (images, specs) -> float (default: ToyEval)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--mutations", type=int, default=2, help="children per kept candidate and round")
    p.add_argument("--output", default="reasoner_prompt.searched.txt", help="where the winner is written")
    p.add_argument("--report", help="write every candidate and score to this JSON file")
    r = p.add_argument_group("reasoner")
    r.add_argument("--reasoner", choices=["local", "api"], default="local")
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=2048)
    r.add_argument("--reasoner-seed", type=int, default=0)
    r.add_argument("--api-base-url", default="", help="chat-completions server root (required with --mode api)")
    r.add_argument("--api-model", default="")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the variable holding the key")
    r.add_argument("--api-timeout", type=float, default=120.0)
    r.add_argument("--api-retries", type=int, default=3)
    g = p.add_argument_group("image generation (LensPipeline)")
    g.add_argument("--model", help="pipeline folder (transformer/, text_encoder/, vae/)")
    g.add_argument("--transformer")
    g.add_argument("--text-encoder", help="GPT-OSS encoder (the local reasoner needs its lm_head too)")
    g.add_argument("--vae")
    g.add_argument("--tokenizer")
    g.add_argument("--preset", default="lens")
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg", type=float)
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--seed", type=int, default=0, help="image noise seed, the same for every candidate")
    g.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call")
    g.add_argument("--device")
    g.add_argument("--dtype", choices=["float32", "bfloat16"])
    return p


def _pipeline_generator(pipe: Any, args: argparse.Namespace) -> ImageGenerator:
    def generate(prompts: list[str]) -> list[Any]:
        images: list[Any] = []
        for i in range(0, len(prompts), max(1, args.batch_size)):
            out = pipe(
                prompts[i : i + args.batch_size],
                preset=args.preset,
                steps=args.steps,
                cfg=args.cfg,
                width=args.width,
                height=args.height,
                seed=args.seed,
            )
            images.extend(out.images)
        return images

    return generate


def _seeds(args: argparse.Namespace) -> list[Candidate]:
    seeds = []
    if not args.no_default:
        seeds.append(
            Candidate("default", DEFAULT_SYSTEM_PROMPT_FILE.read_text(encoding="utf-8").strip(), "packaged")
        )
    for path in args.candidates:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SearchError(f"{path}: cannot read candidate system prompt ({e})") from e
        seeds.append(Candidate(Path(path).stem, text, f"file {Path(path).name}"))
    return seeds


def run_cli(
    args: argparse.Namespace,
    generate: ImageGenerator | None = None,
    backend: ReasonerBackend | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """The CLI's work, with ``generate``/``backend`` injectable (built from the pipeline when None)."""
    seeds = _seeds(args)
    if args.prompts:
        specs = load_prompt_set(args.prompts)
    else:
        try:
            toy_scenes = importlib.import_module("training.toy_scenes")
        except ImportError as e:
            raise SearchError(f"--toy-prompts needs training/toy_scenes.py ({e}); pass --prompts FILE") from e
        specs = toy_scenes.make_prompt_set(args.toy_prompts or 12, args.toy_seed)
    score = load_scorer(args.scorer)
    settings = ReasonerSettings(
        mode=args.reasoner,
        on_error="passthrough",
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.reasoner_seed,
        api_base_url=args.api_base_url,
        api_model=args.api_model,
        api_key_env=args.api_key_env,
        api_timeout_s=args.api_timeout,
        api_max_retries=args.api_retries,
    )
    try:
        settings.validate()
    except ValueError as e:
        raise SearchError(str(e)) from e
    if generate is None or (backend is None and settings.mode == "local"):
        import torch

        from .pipeline import LensPipeline
        from .reasoner import PipelineLocalReasoner

        pipe = LensPipeline(
            transformer=args.transformer or args.model,
            text_encoder=args.text_encoder or args.model,
            vae=args.vae or args.model,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype or ""),
        )
        generate = generate or _pipeline_generator(pipe, args)
        if backend is None and settings.mode == "local":
            backend = PipelineLocalReasoner(pipe)
    result = search(
        seeds,
        specs,
        reasoner_rewriter(settings, backend),
        generate,
        score,
        reasoner_mutator(settings, backend),
        rounds=args.rounds,
        top_k=args.top_k,
        mutations_per_parent=args.mutations,
        log=log,
    )
    log(format_table(result))
    out = save_text_atomic(args.output, result.winner.text)
    log(f"winner {result.winner.name} (score {result.winner.score:.4f}) written to {out}")
    if args.report:
        report = json.dumps([dataclasses.asdict(c) for c in result.candidates], indent=2, ensure_ascii=False)
        save_text_atomic(args.report, report)
    return result


def main(argv: list[str] | None = None) -> int:
    """``lens-prompt-search``: returns 0 on success, 2 on a user-facing error."""
    args = _parser().parse_args(argv)
    return run_command("lens-prompt-search", lambda: run_cli(args))


if __name__ == "__main__":
    sys.exit(main())
