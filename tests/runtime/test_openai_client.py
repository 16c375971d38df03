"""OpenAI conformance with the real `openai` client against a live uvicorn server on the tiny model.

Covers issue 11 point 5 (README streaming loop, usage only when asked, models.retrieve, echo with
prompt logprobs, multi-prompt streaming, logit_bias, response_format with llguidance, 400 for options we
do not implement), issue 16 points 2-3 (/v1/responses streamed and not, the model addressed by its
weights path) and the edge validation of sampling parameters (issue 11 point 1).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from .conftest import LiveServer, settings_for

GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}
CHAT = [{"role": "user", "content": "What is a GPU?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n", "color"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                         "color": {"enum": ["red", "blue"]}}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with LiveServer(settings_for(tiny_model_dir, max_batch_size=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _extra(**kw) -> dict:
    return {"extra_body": kw}


def test_readme_streaming_loop_and_usage_only_when_asked(client):
    stream = client.chat.completions.create(model="tiny-phi-3", messages=CHAT, stream=True, max_tokens=5, temperature=0)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)  # the README loop: IndexError if a chunk has no choice
    assert text and all(c.usage is None for c in chunks)
    whole = client.chat.completions.create(model="tiny-phi-3", messages=CHAT, max_tokens=5, temperature=0)
    assert text == whole.choices[0].message.content
    stream = client.completions.create(model="tiny-phi-3", prompt="hello", stream=True, max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in stream)
    chunks = list(client.chat.completions.create(model="tiny-phi-3", messages=CHAT, stream=True, max_tokens=5,
                                                 temperature=0, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_models_retrieve_and_model_by_path(client, tiny_model_dir):
    assert [m.id for m in client.models.list()] == ["tiny-phi-3"]
    assert client.models.retrieve("tiny-phi-3").id == "tiny-phi-3"
    for path in (str(tiny_model_dir), str(tiny_model_dir) + "/"):
        assert client.models.retrieve(path).id == "tiny-phi-3"
        by_path = client.completions.create(model=path, prompt="hi", **_extra(**GREEDY))
        assert by_path.model == "tiny-phi-3"
        assert by_path.choices[0].text == client.completions.create(model="tiny-phi-3", prompt="hi", **_extra(**GREEDY)).choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="/elsewhere", prompt="hi", max_tokens=2)


def test_echo_with_logprobs_scores_the_prompt(client, server):
    tok = server.runtime.loaded.tokenizer
    prompt = "What is a GPU?"
    ids = tok(prompt)["input_ids"]
    r = client.completions.create(model="tiny-phi-3", prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    # The prompt's scores are the model's: the last prompt position predicts the first generated token.
    plain = client.completions.create(model="tiny-phi-3", prompt=prompt, logprobs=2, max_tokens=3, temperature=0)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_multi_prompt_streaming_matches_unstreamed(client):
    body = {"model": "tiny-phi-3", "prompt": ["hello", "What is a GPU?"], "n": 2, "max_tokens": 4, "temperature": 0}
    whole = client.completions.create(**body, **_extra(ignore_eos=True))
    texts: dict[int, str] = {}
    for chunk in client.completions.create(**body, stream=True, **_extra(ignore_eos=True)):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert texts[0] != texts[2]  # prompt 0's choices are 0-1, prompt 1's are 2-3


def test_logit_bias_moves_and_forces_tokens(client, server, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    tok = server.runtime.loaded.tokenizer
    ids = tok("hello")["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        top2 = ref(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()  # greedy token, runner-up
    first = client.completions.create(model="tiny-phi-3", prompt=ids, max_tokens=2, temperature=0, logprobs=0,
                                      **_extra(ignore_eos=True)).choices[0]
    assert first.logprobs.tokens[0] == tok.decode([top2[0]])
    moved = client.completions.create(model="tiny-phi-3", prompt=ids, max_tokens=1, temperature=0, logprobs=0,
                                      logit_bias={str(top2[0]): -100}, **_extra(ignore_eos=True)).choices[0]
    assert moved.logprobs.tokens[0] == tok.decode([top2[1]])  # -100 on the greedy token: the runner-up wins
    forced_id = tok("sea")["input_ids"][0]
    forced = client.completions.create(model="tiny-phi-3", prompt="hello", max_tokens=3, temperature=1.0, seed=5,
                                       logit_bias={str(forced_id): 100}, **_extra(ignore_eos=True)).choices[0].text
    assert forced == tok.decode([forced_id] * 3)


def test_response_format_json_object_and_schema(client, monkeypatch):
    """Valid JSON (and schema-valid) choices, without llguidance's torch.compile kernel: a server with no C++
    compiler (the slim runtime image) must still serve structured output."""
    import llguidance.torch

    def compiled_kernel(*a, **kw):
        raise AssertionError("llguidance's torch.compile kernel was called")

    monkeypatch.setattr(llguidance.torch, "apply_token_bitmask_inplace", compiled_kernel)
    monkeypatch.setattr(llguidance.torch, "apply_token_bitmask_inplace_kernel", compiled_kernel)
    r = client.chat.completions.create(model="tiny-phi-3", messages=CHAT, max_tokens=60, temperature=1.0, seed=1,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    for seed in (None, 1, 2):
        r = client.chat.completions.create(
            model="tiny-phi-3", messages=CHAT, max_tokens=60, temperature=0 if seed is None else 1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    # The bare base model, unconstrained, does not write this JSON: the grammar did.
    free = client.chat.completions.create(model="tiny-phi-3", messages=CHAT, max_tokens=20, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def _bad(call, param_or_text: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    err = info.value.body if isinstance(info.value.body, dict) else {}
    assert param_or_text in (err.get("param") or "") + " " + err.get("message", ""), err


def test_unimplemented_and_invalid_options_are_400_by_name(client):
    chat = client.chat.completions.create
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, tools=[tool]), "tools")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, modalities=["text", "audio"]), "modalities")
    assert chat(model="tiny-phi-3", messages=CHAT, max_tokens=2, tool_choice="none", modalities=["text"]).choices
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, response_format={"type": "bogus"}), "response_format")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, top_logprobs=2), "top_logprobs")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, response_format={"type": "json_schema"}), "json_schema")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}), "response_format")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, logit_bias={"99999": 5}), "logit_bias")
    _bad(lambda: chat(model="tiny-phi-3", messages=CHAT, logit_bias={"1": 500}), "logit_bias")



def test_lone_surrogates_are_400_like_chat(server):
    # JSON may escape a lone surrogate; it is not text (the openai client cannot even encode it).
    for path, body in (("/v1/completions", b'{"prompt": ["\\ud800"]}'), ("/v1/completions", b'{"prompt": "a\\udc00"}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (path, r.text)


@pytest.mark.parametrize("field,value,words", [
    ("top_p", 1e-46, "float32"), ("top_p", 0, "top_p"), ("temperature", -0.5, "temperature"),
    ("repetition_penalty", 0, "repetition_penalty"), ("repetition_penalty", 1e-40, "repetition_penalty"),
    ("top_k", 1e20, "top_k"), ("n", 0, "n"), ("best_of", 3, "best_of"), ("max_tokens", 0, "max_tokens"),
    ("min_tokens", 9, "min_tokens"), ("presence_penalty", 3, "presence_penalty"), ("logprobs", 21, "logprobs"),
    ("stream_options", {"include_usage": True}, "stream_options"), ("response_format", {"type": "bogus"}, "response_format"),
    ("tool_choice", "auto", "tool_choice"),
])
def test_sampling_bounds_are_checked_at_the_edge(server, field, value, words):
    body = {"prompt": "hi", "max_tokens": 4, field: value}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_kaito_chat_generate_kwargs_bounds(server):
    url = server.url + "/chat"
    for kwargs, field in (({"top_k": 1e20}, "top_k"), ({"top_p": 1e-46}, "top_p"), ({"typical_p": 0.5}, "typical_p"),
                          ({"repetition_penalty": 1e-40}, "repetition_penalty"), ({"temperature": -1}, "temperature")):
        r = httpx.post(url, json={"prompt": "hi", "generate_kwargs": kwargs}, timeout=30)
        assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert httpx.post(url, json={"prompt": ""}, timeout=30).status_code == 400
    # vLLM's rule: a tiny positive temperature is raised to 0.01, and the request is served.
    r = httpx.post(url, json={"prompt": "hi", "generate_kwargs": {"temperature": 1e-40, "max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_responses_api(client, tiny_model_dir):
    r = client.responses.create(model="tiny-phi-3", input="Hello", max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.output_text and r.usage.output_tokens == 6
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    chat = client.chat.completions.create(model="tiny-phi-3", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=6, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    events = list(client.responses.create(model=str(tiny_model_dir), input=[{"role": "user", "content": "Hello"}],
                                          max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete" and "response.output_text.done" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with_instructions = client.responses.create(model="tiny-phi-3", input="Hello", instructions="Be brief.",
                                                max_output_tokens=6, temperature=0)
    assert with_instructions.usage.input_tokens > r.usage.input_tokens
    js = client.responses.create(model="tiny-phi-3", input="Hello", max_output_tokens=60, temperature=0,
                                 text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}})
    jsonschema.validate(json.loads(js.output_text), SCHEMA)
    _bad(lambda: client.responses.create(model="tiny-phi-3", input="Hello", previous_response_id="resp_1"),
         "previous_response_id")


# What Kaito's monitoring docs, vLLM dashboards and keda-kaito-scaler read (vllm/v1/metrics/loggers.py names).
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_max_tokens": "histogram", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram", "vllm:lora_requests_info": "gauge",
}


def test_metrics_have_vllm_names_types_and_model_name(client, server):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        return {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=10).text)}

    before = scrape()
    client.completions.create(model="tiny-phi-3", prompt=["hello", "What is a GPU?"], max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    client.completions.create(model="tiny-phi-3", prompt="hi", max_tokens=50, temperature=0, stop=["\n", "a", "e", "o"])
    fams = scrape()
    for name, kind in VLLM_METRICS.items():
        assert name in fams and fams[name].type == kind, (name, fams.get(name))
        if name != "vllm:lora_requests_info":
            assert {s.labels.get("model_name") for s in fams[name].samples} == {"tiny-phi-3"}, name
            assert {s.labels.get("engine") for s in fams[name].samples} == {"0"}, name

    def value(fams, family, sample, **labels) -> float:
        f = fams.get(family)
        return sum(s.value for s in (f.samples if f else []) if s.name == sample and labels.items() <= s.labels.items())

    assert value(fams, "vllm:generation_tokens", "vllm:generation_tokens_total") - \
        value(before, "vllm:generation_tokens", "vllm:generation_tokens_total") >= 10
    assert value(fams, "vllm:request_success", "vllm:request_success_total", finished_reason="length") - \
        value(before, "vllm:request_success", "vllm:request_success_total", finished_reason="length") >= 2
    for hist in ("vllm:request_prompt_tokens", "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:time_per_output_token_seconds"):
        assert value(fams, hist, hist + "_count") - value(before, hist, hist + "_count") >= 2, hist
    # Idle now: nothing running or waiting, no KV cache held; the info gauge names no adapter.
    assert value(fams, "vllm:num_requests_running", "vllm:num_requests_running") == 0
    assert value(fams, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc") == 0
    info = [s for s in fams["vllm:lora_requests_info"].samples]
    assert len(info) == 1 and info[0].labels["running_lora_adapters"] == "" and info[0].value > 1e9


def test_gauges_while_a_stream_runs(client, server):
    # Sampled, so one token per engine step: a greedy stream of the tiny model decodes in runs of up to 64
    # tokens a call and can be done inside the engine before this reads the gauges.
    stream = client.completions.create(model="tiny-phi-3", prompt="hi", max_tokens=400, temperature=1.0, seed=3,
                                       stream=True, extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        text = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        stream.close()
    assert 'vllm:num_requests_running{engine="0",model_name="tiny-phi-3"} 1.0' in text
    kv = next(x for x in text.splitlines() if x.startswith("vllm:kv_cache_usage_perc{"))
    assert 0 < float(kv.split()[-1]) < 1


def test_lora_requests_info_names_running_and_waiting_adapters():
    from kaito.runtime.metrics import Metrics
    from kaito.runtime.sampling import SamplingParams
    from kaito.runtime.sequence import Sequence

    m = Metrics()
    m.bind("m")
    rows = [Sequence([1, 2, 3], SamplingParams(), lora=(("alpha", 1.0), ("beta", 0.5))), Sequence([1], SamplingParams())]
    queued = [Sequence([4, 5], SamplingParams(), lora=(("gamma", 1.0),))]
    m.record_scheduler(2, rows, queued, capacity_tokens=40)
    text = m.render().decode()
    assert 'running_lora_adapters="alpha,beta"' in text and 'waiting_lora_adapters="gamma"' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1' in text  # 4 of 40 token slots
    m.record_scheduler(0, [], [], capacity_tokens=40)
    assert text.count("vllm:lora_requests_info{") == 1 and m.render().decode().count("vllm:lora_requests_info{") == 1


def test_the_grammar_bitmask_masks_exactly_the_cleared_bits():
    """`apply_bitmask` against a bit-by-bit reference: vocab sizes off a multiple of 32, past the mask's
    words, and words with the sign bit set."""
    import torch
    from kaito.runtime.logits import apply_bitmask

    g = torch.Generator().manual_seed(0)
    for vocab, words in ((70, 3), (64, 2), (100, 3), (31, 1)):
        mask = torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, generator=g)
        mask[0] |= -2**31  # bit 31 set: a negative word
        row = torch.randn(vocab, generator=g)
        want = row.clone()
        for t in range(vocab):
            w = t // 32
            if w >= words or not (int(mask[w]) >> (t % 32)) & 1:
                want[t] = float("-inf")
        got = row.clone()
        apply_bitmask(got, mask)
        assert torch.equal(got, want), (vocab, words)


def test_response_format_on_a_tokenizer_the_grammar_engine_cannot_read_is_a_400():
    """A word-level tokenizer with a WordPiece decoder (the bench models'): a clear 400 naming response_format,
    not an unhandled 500."""
    from kaito.runtime.logits import compile_format
    from kaito.runtime.protocol import ResponseFormat
    from kaito.runtime.serving import ApiError
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(ApiError) as e:
        compile_format(ResponseFormat(type="json_object"), tok, 4, [1])
    assert e.value.status == 400 and e.value.param == "response_format" and "tokenizer" in e.value.message
