"""Drives a running `wick server` with the `openai` Python client (run by tests/server.rs).

Usage: server_client.py BASE_URL WICK_BINARY MODEL_DIR API_KEY

Every generated text is compared with `wick generate`'s greedy output for the same prompt:
chat requests with the plain prompt, the others (tools, multi-turn) with the prompt rendered by
Jinja2 the way transformers renders chat templates (the oracle for our minijinja rendering).
"""

import concurrent.futures
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import openai
from jinja2.sandbox import ImmutableSandboxedEnvironment

BASE, WICK, MODEL_DIR, KEY = sys.argv[1:5]
client = openai.OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=600)
MODEL = client.models.list().data[0].id
CHECKS = []


def check(name):
    def wrap(f):
        CHECKS.append((name, f))
        return f

    return wrap


def generate(prompt, max_tokens, raw=False):
    """`wick generate`'s greedy text (raw: the prompt as is, without the chat template)."""
    cmd = [WICK, "generate", "--model", MODEL_DIR, "-p", prompt, "-m", str(max_tokens), "--verbose", "False"]
    if raw:
        cmd.append("--ignore-chat-template")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.endswith("\n")
    return out[:-1]


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render(messages, tools=None):
    """The chat template rendered as transformers renders it (sandboxed Jinja2, its tojson)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    template = env.from_string((Path(MODEL_DIR) / "chat_template.jinja").read_text())
    return template.render(messages=messages, tools=tools, add_generation_prompt=True)


def chat(messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, **kw)


def user(text):
    return [{"role": "user", "content": text}]


def finish_for(usage_tokens, max_tokens):
    return "length" if usage_tokens == max_tokens else "stop"


@check("chat completions equal wick generate")
def _():
    for prompt in ["Name three colors of the rainbow.", "Write a haiku about rain.", "What is 12 times 7?"]:
        r = chat(user(prompt), max_tokens=48)
        want = generate(prompt, 48)
        got = r.choices[0].message.content
        assert got == want, (prompt, got, want)
        assert r.choices[0].finish_reason == finish_for(r.usage.completion_tokens, 48)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"


@check("text completions equal wick generate --ignore-chat-template")
def _():
    for prompt in ["The three primary colors are", "def fibonacci(n):"]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32)
        want = generate(prompt, 32, raw=True)
        assert r.choices[0].text == want, (prompt, r.choices[0].text, want)
        assert r.object == "text_completion"


def stream_chat(messages, **kw):
    chunks = list(chat(messages, stream=True, **kw))
    ids = {c.id for c in chunks}
    assert len(ids) == 1, f"one response id per stream, got {ids}"
    return chunks


@check("streaming chat: role first, content deltas, finish, usage")
def _():
    prompt = "Give me two tips for learning to cook."
    chunks = stream_chat(user(prompt), max_tokens=40, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generate(prompt, 40), text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1, finishes
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0
    whole = chat(user(prompt), max_tokens=40)
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


@check("stop sequences end the text and are never sent")
def _():
    prompt = "Name three colors of the rainbow."
    full = generate(prompt, 48)
    words = full.split(" ")
    # a stop spanning several tokens, in the middle of the greedy text
    stop = " " + " ".join(words[3:5])
    assert stop in full
    want = full[: full.index(stop)]
    r = chat(user(prompt), max_tokens=48, stop=[stop, "NEVER-PRESENT"])
    assert r.choices[0].message.content == want, (r.choices[0].message.content, want)
    assert r.choices[0].finish_reason == "stop"
    chunks = stream_chat(user(prompt), max_tokens=48, stop=stop)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == want
    assert not any(stop.strip() in p for p in pieces)
    # completions too
    raw = generate("The three primary colors are", 32, raw=True)
    stop = raw.split(" ")[3]
    r = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=32, stop=stop)
    assert r.choices[0].text == raw[: raw.index(stop)]


@check("logprobs: the greedy token is the most likely one, alternatives sorted, probabilities sum to at most 1")
def _():
    prompt = "What is the capital of France?"
    r = chat(user(prompt), max_tokens=12, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    assert text == generate(prompt, 12)
    assert "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 5
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert sum(math.exp(x) for x in lps) <= 1 + 1e-4
        assert bytes(t.bytes) == t.token.encode()
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and abs(max(top.values()) - l) < 1e-5 and top[tok] == l


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def called(city):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_" + city, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}],
    }


@check("tool calls: tools reach the template, the model's call comes back as tool_calls")
def _():
    messages = [
        *user("What is the weather in Paris?"),
        called("Paris"),
        *user("What is the weather in Berlin?"),
        called("Berlin"),
        *user("What is the weather in London?"),
    ]
    # the oracle renders with arguments as objects, as the server hands them to the template
    oracle = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}} for c in m["tool_calls"]]) if "tool_calls" in m else m for m in messages]
    raw = generate(render(oracle, [WEATHER]), 40, raw=True)
    assert "<tool_call>" in raw, raw
    want_call = json.loads(raw.split("<tool_call>")[1].split("</tool_call>")[0])
    r = chat(messages, tools=[WEATHER], max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == want_call["name"] == "get_weather"
    assert json.loads(call.function.arguments) == want_call["arguments"] == {"city": "London"}
    assert (c.message.content or "") == raw.split("<tool_call>")[0]
    # streamed, the call arrives whole in one delta
    chunks = stream_chat(messages, tools=[WEATHER], max_tokens=40)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and json.loads(calls[0].function.arguments) == {"city": "London"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a tool result in the conversation renders and generates like the oracle
    follow = messages[:-1] + [{"role": "tool", "content": "rainy, 12 C"}, *user("Thanks!")]
    oracle = oracle[:-1] + [{"role": "tool", "content": "rainy, 12 C"}, *user("Thanks!")]
    r = chat(follow, tools=[WEATHER], max_tokens=24)
    want = generate(render(oracle, [WEATHER]), 24, raw=True)
    got = r.choices[0].message
    if "<tool_call>" in want:
        assert (got.content or "") == want.split("<tool_call>")[0] and got.tool_calls, (got, want)
    else:
        assert got.content == want and not got.tool_calls, (got, want)


@check("a conversation's next turn reuses the cached prefix and still equals the full computation")
def _():
    first = user("Tell me a fact about the moon.")
    r1 = chat(first, max_tokens=30)
    answer = r1.choices[0].message.content
    second = first + [{"role": "assistant", "content": answer}] + user("And one about the sun?")
    r2 = chat(second, max_tokens=30)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # the whole first turn (its prompt and answer) is reused
    assert cached >= r1.usage.prompt_tokens + r1.usage.completion_tokens - 2, (cached, r1.usage)
    assert r2.choices[0].message.content == generate(render(second), 30, raw=True)


@check("16 simultaneous streaming clients each get their single-request greedy output")
def _():
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    barrier = threading.Barrier(16)

    def run(p):
        barrier.wait()
        return "".join(c.choices[0].delta.content or "" for c in stream_chat(user(p), max_tokens=24) if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    alone = [chat(user(p), max_tokens=24).choices[0].message.content for p in prompts]
    for p, t, a in zip(prompts, together, alone):
        assert t == a, (p, t, a)
    for i in (0, 7, 15):
        assert alone[i] == generate(prompts[i], 24), prompts[i]


@check("requests joining a running batch (in the slots of finished ones) get their single-request greedy output")
def _():
    # 6 clients, 4 requests each, back to back, of different lengths: every request after a
    # client's first joins a batch that is decoding, mostly in the slot of one that left
    jobs = [[(f"Name {k + 2} animals that live in place number {c}.", 6 + 5 * ((c + k) % 4)) for k in range(4)] for c in range(6)]

    def client(reqs):
        return [chat(user(p), max_tokens=n).choices[0].message.content for p, n in reqs]

    alone = [client(reqs) for reqs in jobs]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(client, jobs))
    for reqs, want, got in zip(jobs, alone, together):
        for (p, n), a, t in zip(reqs, want, got):
            assert t == a, (p, n, t, a)
    for c, k in ((0, 0), (3, 2), (5, 3)):
        p, n = jobs[c][k]
        assert alone[c][k] == generate(p, n), (p, n)


@check("errors: unknown model 404, wrong key 401, bad field 400")
def _():
    try:
        client.chat.completions.create(model="no-such-model", messages=user("hi"))
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError:
        pass
    bad = openai.OpenAI(base_url=BASE + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass
    try:
        chat(user("hi"), temperature="hot")
        raise AssertionError("bad temperature accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body


failed = 0
for name, f in CHECKS:
    try:
        f()
        print(f"ok   {name}", flush=True)
    except Exception as e:  # report every check, then fail
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
sys.exit(1 if failed else 0)
