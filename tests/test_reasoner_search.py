"""System-prompt search: the loop with a scripted LLM and deterministic scorers, ToyEval, the CLI."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lens_core import prompt_search as ps
from lens_core.reasoner import CACHE, Completion, ReasonerSettings

SCRIPTED_URL = "http://127.0.0.1:9/v1"  # scripted backends answer; nothing is ever sent here

HAS_TOYEVAL = importlib.util.find_spec("training.toyeval") is not None



@pytest.fixture(autouse=True)
def _fresh_cache():
    CACHE.clear()
    yield
    CACHE.clear()


class ScriptedLLM:
    """Rewrites add one " vivid" per "vivid" rule in the system prompt; mutations add a numbered rule."""

    identity = "scripted|1"

    def __init__(self) -> None:
        self.rewrites = 0
        self.mutations = 0
        self.seeds: list[int | None] = []

    def complete(self, system_prompt: str, user_prompt: str, settings: ReasonerSettings) -> Completion:
        if system_prompt == ps.MUTATION_INSTRUCTION:
            self.mutations += 1
            self.seeds.append(settings.seed)
            parent = user_prompt.split("<<<\n", 1)[1].rsplit("\n>>>", 1)[0]
            return Completion(f"{parent}\nRule {self.mutations}: be vivid.")
        self.rewrites += 1
        return Completion(user_prompt + " vivid" * system_prompt.count("vivid"))


def brightness_generate(prompts: list[str]) -> list[Image.Image]:
    """Image brightness grows with the number of "vivid" words (capped)."""
    return [Image.new("RGB", (8, 8), (min(255, 40 * p.count("vivid")),) * 3) for p in prompts]


def brightness_score(images, specs) -> float:
    return float(np.mean([np.asarray(im, dtype=np.float32).mean() / 255 for im in images]))


SPECS = [{"prompt": "a cat"}, {"prompt": "two dogs"}, {"prompt": "a red cube"}]


def test_search_keeps_the_best_and_mutates_it():
    llm = ScriptedLLM()
    settings = ReasonerSettings(mode="api", api_base_url=SCRIPTED_URL, api_model="x", seed=11)
    seeds = [
        ps.Candidate("plain", "Describe the image."),
        ps.Candidate("one", "Describe the image; be vivid."),
        ps.Candidate("dup", "describe the image;   BE VIVID."),  # same text: skipped
    ]
    logs: list[str] = []
    result = ps.search(
        seeds,
        SPECS,
        ps.reasoner_rewriter(settings, llm),
        brightness_generate,
        brightness_score,
        ps.reasoner_mutator(settings, llm),
        rounds=2,
        top_k=1,
        mutations_per_parent=2,
        log=logs.append,
    )
    names = [c.name for c in result.candidates]
    assert "dup" not in names and any("duplicate" in line for line in logs)
    # 2 seeds + 2 children per round (top-1 parent, 2 mutations) for 2 rounds.
    assert len(result.candidates) == 6 and llm.mutations == 4
    assert llm.rewrites == 6 * len(SPECS)
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    winner = result.winner
    assert winner.round == 2 and winner.text.count("vivid") == 3  # seed rule + one per round
    assert winner.origin.startswith("mutation") and winner.example.startswith("a cat vivid")
    assert len(set(llm.seeds)) == len(llm.seeds)  # every mutation sampled with its own seed
    table = ps.format_table(result)
    assert table.splitlines()[1].split()[:3] == ["1", f"{winner.score:.4f}", "2"]
    assert len(table.splitlines()) == 7


def test_failed_or_repeated_mutations_are_skipped():
    class Broken(ScriptedLLM):
        def complete(self, system_prompt, user_prompt, settings):
            if system_prompt == ps.MUTATION_INSTRUCTION:
                raise RuntimeError("LLM down")
            return super().complete(system_prompt, user_prompt, settings)

    llm = Broken()
    settings = ReasonerSettings(mode="api", api_base_url=SCRIPTED_URL, api_model="x")
    logs: list[str] = []
    result = ps.search(
        [ps.Candidate("a", "Be vivid.")],
        SPECS,
        ps.reasoner_rewriter(settings, llm),
        brightness_generate,
        brightness_score,
        ps.reasoner_mutator(settings, llm),
        rounds=3,
        log=logs.append,
    )
    assert [c.name for c in result.candidates] == ["a"]
    assert any("stopping early" in line for line in logs)


def test_fallbacks_are_counted():
    class Flaky(ScriptedLLM):
        def complete(self, system_prompt, user_prompt, settings):
            if user_prompt == "two dogs":
                return Completion(None, ["no final answer"])
            return super().complete(system_prompt, user_prompt, settings)

    llm = Flaky()
    settings = ReasonerSettings(mode="api", api_base_url=SCRIPTED_URL, api_model="x", on_error="passthrough")
    result = ps.search(
        [ps.Candidate("a", "vivid")],
        SPECS,
        ps.reasoner_rewriter(settings, llm),
        brightness_generate,
        brightness_score,
        None,
        rounds=1,
        log=lambda _: None,
    )
    assert result.winner.fallbacks == 1


def test_bad_inputs():
    with pytest.raises(ps.SearchError):
        ps.search([], SPECS, None, None, None, None)
    with pytest.raises(ps.SearchError):
        ps.search([ps.Candidate("a", "x")], [], None, None, None, None)


def test_save_text_atomic(tmp_path):
    out = ps.save_text_atomic(tmp_path / "sub" / "winner.txt", "hello")
    assert out.read_text() == "hello\n"
    ps.save_text_atomic(out, "again\n")
    assert out.read_text() == "again\n"
    assert [p.name for p in out.parent.iterdir()] == ["winner.txt"]  # no temp files left


def test_load_prompt_set(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "kind": "single"}]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n')
    (tmp_path / "c.txt").write_text("one\n\n two \n")
    assert ps.load_prompt_set(tmp_path / "a.json") == [
        {"prompt": "a cat"},
        {"prompt": "a dog", "kind": "single"},
    ]
    assert [s["prompt"] for s in ps.load_prompt_set(tmp_path / "b.jsonl")] == ["x", "y"]
    assert [s["prompt"] for s in ps.load_prompt_set(tmp_path / "c.txt")] == ["one", "two"]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "no prompt"}]))
    with pytest.raises(ps.SearchError, match="entry 0"):
        ps.load_prompt_set(tmp_path / "d.json")


@pytest.mark.skipif(not HAS_TOYEVAL, reason="training/toyeval.py is not present")
def test_toyeval_scorer_prefers_the_faithful_candidate():
    from training.toy_scenes import make_prompt_set, render_scene, scene_from_dict

    specs = make_prompt_set(6, seed=0)
    llm = ScriptedLLM()

    def generate(prompts):
        # A faithful rewrite (it carries the "vivid" marker) draws the asked-for scene; otherwise blank.
        return [
            render_scene(scene_from_dict(s["scene"]), 256, 256)
            if "vivid" in p
            else Image.new("RGB", (256, 256))
            for p, s in zip(prompts, specs, strict=True)
        ]

    settings = ReasonerSettings(mode="api", api_base_url=SCRIPTED_URL, api_model="x")
    result = ps.search(
        [ps.Candidate("plain", "Describe."), ps.Candidate("faithful", "Describe; be vivid.")],
        specs,
        ps.reasoner_rewriter(settings, llm),
        generate,
        ps.load_scorer(None),  # the default: ToyEval
        None,
        rounds=0,
        log=lambda _: None,
    )
    assert result.winner.name == "faithful"
    assert result.winner.score > 0.8 and result.candidates[1].score < 0.2
    with pytest.raises(ps.SearchError, match="kind"):
        ps.toyeval_score([Image.new("RGB", (32, 32))], [{"prompt": "a cat"}])


def test_run_cli_with_injected_backends(tmp_path, capsys):
    cand = tmp_path / "mine.txt"
    cand.write_text("Describe the scene, be vivid.")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a cat", "a dog"]))
    args = ps._parser().parse_args(
        [
            "--candidates",
            str(cand),
            "--prompts",
            str(prompts),
            "--scorer",
            f"{__name__}:brightness_score",
            "--reasoner",
            "api",
            "--api-base-url",
            SCRIPTED_URL,
            "--api-model",
            "m",
            "--rounds",
            "1",
            "--top-k",
            "1",
            "--mutations",
            "1",
            "--output",
            str(tmp_path / "out" / "winner.txt"),
            "--report",
            str(tmp_path / "report.json"),
        ]
    )
    lines: list[str] = []
    result = ps.run_cli(args, generate=brightness_generate, backend=ScriptedLLM(), log=lines.append)
    assert [c.name for c in result.candidates][0] == "r1.0"
    winner = (tmp_path / "out" / "winner.txt").read_text()
    assert winner.strip() == result.winner.text and "Rule 1" in winner
    report = json.loads((tmp_path / "report.json").read_text())
    assert {r["name"] for r in report} == {"default", "mine", "r1.0"}
    assert any(line.lstrip().startswith("rank") for line in "\n".join(lines).splitlines())


def test_main_reports_errors(tmp_path, capsys):
    code = ps.main(["--prompts", str(tmp_path / "missing.json"), "--reasoner", "api", "--api-model", "m"])
    assert code == 2 and "cannot read the prompt set" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# End to end: the real CLI, the tiny random pipeline for images, an HTTP chat server as the LLM.


class _LLMServer:
    def __init__(self) -> None:
        outer = self
        self.calls = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.calls += 1
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                text = (
                    "Be exact about counts and colours."
                    if system == ps.MUTATION_INSTRUCTION
                    else f"{user}, detailed"
                )
                payload = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.skipif(not HAS_TOYEVAL, reason="training/toyeval.py is not present")
def test_cli_end_to_end(tiny_pipeline, tmp_path, capsys):
    server = _LLMServer()
    try:
        out = tmp_path / "winner.txt"
        code = ps.main(
            [
                "--toy-prompts",
                "2",
                "--rounds",
                "1",
                "--top-k",
                "1",
                "--mutations",
                "1",
                "--reasoner",
                "api",
                "--api-base-url",
                server.url,
                "--api-model",
                "m",
                "--model",
                str(tiny_pipeline),
                "--steps",
                "1",
                "--cfg",
                "1",
                "--width",
                "64",
                "--height",
                "64",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
    finally:
        server.close()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "rank" in captured.out and "written to" in captured.out
    assert out.read_text().strip() in {
        Path(ps.DEFAULT_SYSTEM_PROMPT_FILE).read_text().strip(),
        "Be exact about counts and colours.",
    }
    assert server.calls == 2 + 1 + 2  # default rewrites 2 prompts, 1 mutation, the child rewrites 2
