"""`run_batch` (OpenAI batch files) and the `caraserve` CLI.

Fast tests drive `run_batch` with a scripted fake engine; the slow ones run the real engine on the embedded
default model, with a few tokens per request.
"""
from __future__ import annotations

import json

import pytest

from services.cli import main
from services.gpu_worker.engine.sequence import FinishReason, RequestOutput, TokenLogprob
from services.gpu_worker.run_batch import format_table, run_batch

EOS = 0


class FakeEngineRequestError(ValueError):
    pass


class FakeTokenizer:
    all_special_ids = [EOS]


class FakeEngine:
    """One token a step per request: token ids 1, 2, ... (text "t1 ", "t2 ", ...); a prompt containing "eos"
    ends with EOS after two tokens."""

    model_name = "base"
    tokenizer = FakeTokenizer()

    def __init__(self) -> None:
        self.requests: dict[str, dict] = {}
        self.added: list[tuple[str, object, str | None]] = []
        self.max_running = 0
        self.steps = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def adapter_names(self) -> list[str]:
        return ["ad"]

    def encode_chat(self, messages):
        return [7] * sum(len(m["content"]) for m in messages) + (["eos"] if "eos" in messages[-1]["content"] else [])

    def add_request(self, request_id, prompt, params, adapter=None):
        if not prompt:
            raise FakeEngineRequestError("the prompt is empty")
        self.added.append((request_id, prompt, adapter))
        self.requests[request_id] = {"params": params, "n": 0, "prompt": prompt}

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def abort(self, request_id):
        self.requests.pop(request_id, None)

    def token_text(self, token_id: int) -> str:
        return "</s>" if token_id == EOS else f"t{token_id} "

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        self.max_running = max(self.max_running, len(self.requests))
        outputs = []
        for rid, r in list(self.requests.items()):
            r["n"] += 1
            prompt = r["prompt"]
            eos = "eos" in prompt and r["n"] == 3
            token = EOS if eos else r["n"]
            reason = FinishReason.STOP if eos else (FinishReason.LENGTH if r["n"] >= r["params"].max_tokens else None)
            lp = [TokenLogprob(token, -0.5, [(token, -0.5), (99, -2.0)][: max(1, r["params"].top_logprobs)])]
            outputs.append(RequestOutput(rid, [token], "" if eos else self.token_text(token), reason is not None,
                                         reason, lp if r["params"].logprobs else None, len(prompt), r["n"]))
            if reason is not None:
                del self.requests[rid]
        return outputs


def line(custom_id, body, url="/v1/chat/completions", method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def chat_body(content="hello", model="base", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def body_of(record):
    assert record["error"] is None and record["response"]["status_code"] == 200, record
    return record["response"]["body"]


def test_mixed_lines_keep_input_order_and_the_good_ones_run():
    engine = FakeEngine()
    lines = [
        line("ok-chat", chat_body()),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),
        line("ok-chat", chat_body()),  # duplicate custom_id
        line("bad-url", chat_body(), url="/v1/embeddings"),
        line("bad-method", chat_body(), method="GET"),
        json.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/completions"}),
        "",
        line("bad-param", chat_body(n=2)),
        line("unknown-model", chat_body(model="gpt-4")),
        line("empty-prompt", {"model": "base", "prompt": ""}, url="/v1/completions"),
        line("ok-adapter", {"model": "ad", "prompt": [5, 6], "max_tokens": 3}, url="/v1/completions"),
    ]
    records = run_batch(engine, lines)
    assert len(records) == len(lines) - 1  # the blank line is not a request
    assert [r["custom_id"] for r in records] == [
        "ok-chat", None, None, "ok-chat", "bad-url", "bad-method", "no-body", "bad-param", "unknown-model",
        "empty-prompt", "ok-adapter"]
    assert all(r["id"].startswith("batch_req_") for r in records)
    assert len({r["id"] for r in records}) == len(records)

    first = body_of(records[0])
    assert first["object"] == "chat.completion" and first["model"] == "base"
    assert first["choices"][0]["message"]["content"] == "t1 t2 " and first["choices"][0]["finish_reason"] == "length"
    assert first["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert records[0]["response"]["request_id"].startswith("req_")

    codes = [r["error"]["code"] if r["response"] is None else None for r in records[1:7]]
    assert codes == ["invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_url", "invalid_method",
                     "invalid_body"]
    for r in records[1:7]:
        assert "\n" not in r["error"]["message"]

    bad_param = records[7]["response"]
    assert bad_param["status_code"] == 400 and bad_param["body"]["error"]["param"] == "n"
    unknown = records[8]["response"]
    assert unknown["status_code"] == 404 and unknown["body"]["error"]["code"] == "model_not_found"
    empty = records[9]["response"]
    assert empty["status_code"] == 400 and empty["body"]["error"]["message"] == "the prompt is empty"

    adapter = body_of(records[10])
    assert adapter["object"] == "text_completion" and adapter["model"] == "ad"
    assert adapter["choices"][0]["text"] == "t1 t2 t3 "

    # all valid requests went to the engine before the first step, the adapter's by name
    assert engine.max_running == 2
    assert [a for _, _, a in engine.added] == [None, "ad"]


def test_logprobs_shapes_and_eos_left_out():
    engine = FakeEngine()
    records = run_batch(engine, [
        line("chat", chat_body("say eos", max_tokens=5, logprobs=True, top_logprobs=2)),
        line("text", {"model": "base", "prompt": "x", "max_tokens": 2, "logprobs": 1}, url="/v1/completions"),
        line("plain", chat_body()),
    ])
    chat = body_of(records[0])["choices"][0]
    assert chat["finish_reason"] == "stop" and chat["message"]["content"] == "t1 t2 "
    content = chat["logprobs"]["content"]
    assert [c["token"] for c in content] == ["t1 ", "t2 "]  # EOS is not in the text, so not in the logprobs
    assert content[0]["top_logprobs"] == [{"token": "t1 ", "logprob": -0.5, "bytes": list(b"t1 ")},
                                         {"token": "t99 ", "logprob": -2.0, "bytes": list(b"t99 ")}]
    assert body_of(records[0])["usage"]["completion_tokens"] == 3

    text = body_of(records[1])["choices"][0]["logprobs"]
    assert text == {"tokens": ["t1 ", "t2 "], "token_logprobs": [-0.5, -0.5],
                    "top_logprobs": [{"t1 ": -0.5}, {"t2 ": -0.5}], "text_offset": [0, 3]}
    assert body_of(records[2])["choices"][0]["logprobs"] is None


def test_streaming_is_refused_in_a_batch():
    records = run_batch(FakeEngine(), [line("s", chat_body(stream=True))])
    assert records[0]["response"]["status_code"] == 400
    assert records[0]["response"]["body"]["error"]["param"] == "stream"


def test_interrupted_batch_aborts_its_requests():
    engine = FakeEngine()

    def boom():
        raise KeyboardInterrupt

    engine.step = boom
    with pytest.raises(KeyboardInterrupt):
        run_batch(engine, [line("a", chat_body()), line("b", chat_body())])
    assert engine.requests == {}


def test_format_table_groups_by_question():
    table = format_table([("Q1?", "base", "A1"), ("Q1?", "caps", "LINE ONE\nLINE TWO"), ("Q2?", "base", "")], 80)
    lines = table.splitlines()
    assert lines[0].split() == ["Question", "Model", "Answer"]
    assert lines[2].split() == ["Q1?", "base", "A1"]
    assert lines[3].split() == ["caps", "LINE", "ONE"] and lines[4].split() == ["LINE", "TWO"]
    assert lines[5] == "" and lines[6].split() == ["Q2?", "base"]


# ---------------------------------------------------------------- CLI without an engine


def test_cli_bad_lora_modules(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(line("a", chat_body()) + "\n")
    args = ["run-batch", "-i", str(inp), "-o", str(tmp_path / "out.jsonl")]
    assert main(args + ["--lora-modules", "noequals"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "caraserve run-batch: error: --lora-modules: expected NAME=PATH, got 'noequals'"
    assert main(args + ["--lora-modules", "a=/nonexistent/adapter"]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert main(args + ["--lora-modules", f"a={tmp_path}", "--lora-modules", f"a={tmp_path}"]) == 1
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_run_batch_with_a_fake_engine(tmp_path, monkeypatch, capsys):
    import services.gpu_worker.run_batch as rb

    monkeypatch.setattr(rb, "build_engine", lambda args: FakeEngine())
    inp, out = tmp_path / "in.jsonl", tmp_path / "sub" / "out.jsonl"
    # U+2028 is a line break to str.splitlines() but not to JSON Lines
    raw = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                      "body": chat_body("x\u2028y")}, ensure_ascii=False)
    assert "\u2028" in raw
    inp.write_text(raw + "\n" + line("b", chat_body(model="nope")) + "\n\n", encoding="utf-8")
    assert main(["run-batch", "-i", str(inp), "-o", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().split("\n") if x]
    assert [r["custom_id"] for r in records] == ["a", "b"]
    assert body_of(records[0])["usage"]["prompt_tokens"] == 3
    assert "2 requests (1 failed)" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 1
    assert "--input: No such file or directory" in capsys.readouterr().err


def test_cli_usage_errors(tmp_path, capsys):
    assert main([]) == 2
    assert main(["run-batch", "-i", "x"]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "run-batch" in capsys.readouterr().out


# ---------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def engine(default_model_path):
    from services.gpu_worker.engine.config import EngineConfig
    from services.gpu_worker.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(default_model_path), served_model_name="smol", dtype="float32"))


@pytest.mark.slow
def test_real_engine_chat_completions_logprobs_and_errors(engine):
    records = run_batch(engine, [
        line("chat", chat_body("What is the capital of France?", model="smol", max_tokens=6, temperature=0,
                               logprobs=True, top_logprobs=2)),
        line("unknown", chat_body(model="nope")),
        line("text", {"model": "smol", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0,
                      "logprobs": 1}, url="/v1/completions"),
        line("too-long", {"model": "smol", "prompt": [1] * (engine.max_model_len + 1), "max_tokens": 1},
             url="/v1/completions"),
    ])
    chat = body_of(records[0])
    assert chat["choices"][0]["message"]["content"].startswith("The capital of France")
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] == 6
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    assert "".join(c["token"] for c in content) == chat["choices"][0]["message"]["content"]
    assert records[1]["response"]["status_code"] == 404
    text = body_of(records[2])
    assert text["choices"][0]["text"] == " Paris." and text["choices"][0]["finish_reason"] == "length"
    lp = text["choices"][0]["logprobs"]
    assert lp["tokens"] == [" Paris", "."] and lp["text_offset"] == [0, 6]
    assert text["usage"]["prompt_tokens"] == 5
    assert records[3]["response"]["status_code"] == 400
    assert "context" in records[3]["response"]["body"]["error"]["message"]


@pytest.mark.slow
def test_cli_run_batch_end_to_end(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([
        line("a", {"model": "base", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0},
             url="/v1/completions"),
        "oops",
    ]) + "\n")
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--served-model-name", "base",
                 "--max-num-seqs", "4"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == ["a", None]
    assert body_of(records[0])["choices"][0]["text"] == " Paris."
    assert records[1]["error"]["code"] == "invalid_json"
    assert "2 requests (1 failed)" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_refuses_an_invalid_adapter(tmp_path, capsys):
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    inp = tmp_path / "in.jsonl"
    inp.write_text(line("a", chat_body()) + "\n")
    code = main(["run-batch", "-i", str(inp), "-o", str(tmp_path / "out.jsonl"), "--lora-modules", f"bad={bad}"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"caraserve run-batch: error: --lora-modules: bad={bad}: ")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_demo_runs_through_run_batch(engine, tmp_path, monkeypatch, capsys):
    import services.gpu_worker.run_batch as rb

    monkeypatch.setattr(rb, "build_engine", lambda args: engine)  # the CLI path itself is tested above
    out = tmp_path / "demo.jsonl"
    assert main(["demo", "--question", "What is the capital of France?", "--max-tokens", "2",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Question" in printed and "What is the capital of" in printed and "The capital" in printed
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records and all(r["response"]["status_code"] == 200 for r in records)
    assert records[0]["custom_id"] == "q0-smol"
    assert len(records) == 1 + len(engine.adapter_names())  # the base model and every demo adapter found
