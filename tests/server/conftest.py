"""Fixtures: a tiny random Llama checkpoint, CPU engines over it, live uvicorn servers on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Context of the tiny model: room for requests that stay in flight while a test looks at them.
MAX_POS = 512
# Bound on waits for a state that an idle machine reaches in milliseconds; only a hung
# server or engine gets there. No test asserts how long anything takes.
HANG_S = 120
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights and activations to four bit integers.",
    "Rotations spread outliers so that low precision loses less information.",
    "A server answers completions and chat completions over HTTP.",
    "Hello world! Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u6f22\u5b57 \U0001f600 emoji and accents.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation , . ; : ? ! ( ) [ ] { }",
]


def build_tokenizer(vocab_size: int = 384):
    """A PreTrainedTokenizerFast: byte-level BPE trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0],
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden: int = 64):
    """A 2-layer random LlamaForCausalLM (GQA 4/2 heads, head_dim hidden/4), EOS = token 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                      eos_token_id=0, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Sharper logits than the default init: sampling is not near-uniform and greedy has no near-ties.
        model.lm_head.weight.mul_(20.0)
    return model


def save_tiny_checkpoint(out: str, hidden: int = 64) -> str:
    """Write the tiny model and tokenizer as a plain Hugging Face checkpoint directory."""
    tok = build_tokenizer()
    assert tok.convert_tokens_to_ids(SPECIAL[0]) == 0
    build_model(len(tok), hidden=hidden).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A plain Hugging Face checkpoint directory of the tiny model and tokenizer."""
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_ckpt")))


@pytest.fixture(scope="session")
def gpu_ckpt(tmp_path_factory) -> str:
    """The tiny model with head_dim 64 (what GPU attention kernels expect)."""
    return save_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu_ckpt")), hidden=256)


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    """(model, tokenizer) loaded once per session; engines share them (inference only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture
def make_engine(tiny_model, tiny_ckpt):
    def make(**kw: Any):
        from spinquant_server.cpu_engine import CPUEngine
        from spinquant_server.engine import read_checkpoint_info

        model, tok = tiny_model
        kw.setdefault("num_threads", 1)
        return CPUEngine(model, tok, model_path=tiny_ckpt, info=read_checkpoint_info(tiny_ckpt), **kw)
    return make


def _wait_until(predicate: Callable[[], bool], what: str, hang_s: float = HANG_S) -> None:
    """Poll `predicate` until it holds. Only a hung server reaches `hang_s`: the wait is for
    a state to be reached, its duration is never what a test asserts."""
    deadline = time.monotonic() + hang_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {hang_s} s: {what}")
        time.sleep(0.01)


def _open_request(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """POST `body` as JSON on a raw socket and return the socket unread: closing it is a
    client disconnect at a moment the test chooses (no client timeout involved)."""
    u = urllib.parse.urlsplit(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@dataclass
class LiveServer:
    url: str
    engine: Any
    app: Any
    server: Any
    thread: threading.Thread

    #: the hang guard of waits on this server (see HANG_S)
    hang_s = HANG_S

    @property
    def state(self):
        return self.app.state.server

    def wait_engine_in_flight(self, count: int) -> None:
        """Wait until exactly `count` sequences are inside the engine (a CPUEngine)."""
        assert self.engine.wait_in_flight(count, HANG_S), \
            f"engine never had {count} sequences in flight (has {self.engine.num_in_flight})"

    def wait_idle(self) -> None:
        """Wait until neither the app nor the engine holds a request."""
        _wait_until(lambda: self.engine.num_in_flight == 0 and self.state.in_flight == 0,
                   f"requests in flight: engine {self.engine.num_in_flight}, app {self.state.in_flight}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=HANG_S)
        assert not self.thread.is_alive(), "server thread did not stop"


def start_server(engine: Any, **settings: Any) -> LiveServer:
    """Start uvicorn with our app on 127.0.0.1 (free port) in a daemon thread; returns once it listens."""
    import uvicorn

    from spinquant_server.app import Server, create_app
    from spinquant_server.state import ServerSettings

    settings.setdefault("served_model_name", "tiny")
    app = create_app(engine, ServerSettings(**settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    listening = threading.Event()
    # The drain waits for in-flight responses up to HANG_S: only a hung response reaches it.
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=HANG_S),
                    on_started=lambda _server: listening.set())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_until(lambda: listening.is_set() or not thread.is_alive(), "the live server to listen")
    if not listening.is_set():
        raise RuntimeError("live server did not start (its thread exited)")
    return LiveServer(f"http://127.0.0.1:{port}", engine, app, server, thread)


@pytest.fixture
def wait_until():
    """`_wait_until(predicate, what)`: poll until a state is reached (hang guard only)."""
    return _wait_until


@pytest.fixture
def open_request():
    """`_open_request(url, path, body)`: a POST on a raw socket, to disconnect when the test decides."""
    return _open_request


@pytest.fixture(scope="module")
def live(tiny_model, tiny_ckpt):
    """One live server per test module, default settings, model name "tiny"."""
    from spinquant_server.cpu_engine import CPUEngine
    from spinquant_server.engine import read_checkpoint_info

    model, tok = tiny_model
    engine = CPUEngine(model, tok, model_path=tiny_ckpt, info=read_checkpoint_info(tiny_ckpt), num_threads=1)
    srv = start_server(engine)
    yield srv
    srv.stop()


@pytest.fixture
def live_factory(make_engine):
    """Start extra live servers with custom settings; all stopped at teardown."""
    started: list[LiveServer] = []

    def make(engine_kw: dict | None = None, **settings: Any) -> LiveServer:
        srv = start_server(make_engine(**(engine_kw or {})), **settings)
        started.append(srv)
        return srv
    yield make
    for srv in started:
        srv.stop()


def pytest_configure(config):
    # Requests go to 127.0.0.1 only; keep proxies from intercepting them.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ.setdefault(var, "127.0.0.1,localhost")
