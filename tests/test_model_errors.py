"""model.py on bad checkpoints: each corrupt or inconsistent input is one clear ValueError / OSError
naming the file and what was expected, never a traceback from deep inside or silent garbage."""

import http.server
import json
import struct
import threading

import pytest
import torch

import model as M


def write_st(path, header, data=b""):
    """A .safetensors file written by hand: 8-byte length, JSON header, data."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def F32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# ----------------------------------------------------------------------------------------------
# safetensors headers, checked as the safetensors package checks them


@pytest.mark.parametrize("header,data,match", [
    ([1, 2], b"", r"corrupt safetensors header \(expected a JSON object"),
    ({"__metadata__": [1], "w": F32([1], 0, 4)}, bytes(4), r"corrupt safetensors header"),
    ({"w": 3}, b"", r"tensor w: expected an object with dtype, shape and data_offsets"),
    ({"w": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"tensor w: expected an object with dtype"),
    ({"w": {"dtype": "F32", "shape": [1]}}, bytes(4), r"tensor w: expected an object with .*data_offsets"),
    ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"tensor w has unsupported dtype"),
    ({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), r"tensor w has unsupported dtype 'Q4'"),
    ({"w": F32([1], -4, 0)}, bytes(4), r"tensor w: data_offsets \[-4, 0\] are not \[begin, end\]"),
    ({"w": F32([1], 0.0, 4.0)}, bytes(4), r"tensor w: data_offsets \[0\.0, 4\.0\] are not"),
    ({"w": F32([1], 0, True)}, bytes(4), r"tensor w: data_offsets \[0, True\] are not"),
    ({"w": F32([0], 4, 0)}, bytes(4), r"tensor w: data_offsets \[4, 0\] are not .*begin <= end"),
    ({"w": F32([1, 2, 3], 0, 4)}, bytes(4), r"tensor w: 4 bytes for shape \[1, 2, 3\] F32"),
    ({"w": F32([-1, -1], 0, 4)}, bytes(4), r"tensor w: shape \[-1, -1\] is not a list of non-negative integers"),
    ({"w": F32([2.0], 0, 8)}, bytes(8), r"tensor w: shape \[2\.0\] is not a list of non-negative integers"),
    ({"w": F32(4, 0, 16)}, bytes(16), r"tensor w: shape 4 is not a list"),
    ({"w": F32([2], 0, 8), "v": F32([2], 4, 12)}, bytes(12), r"tensor v: data_offsets \[4, 12\] overlap"),
    ({"w": F32([2], 0, 8), "v": F32([2], 0, 8)}, bytes(8), r"tensor \w: data_offsets \[0, 8\] overlap"),
    ({"w": F32([1], 0, 4), "v": F32([1], 8, 12)}, bytes(12), r"tensor v: data_offsets \[8, 12\] leave a gap"),
    ({"w": F32([1], 4, 8), "v": F32([1], 8, 12)}, bytes(12), r"tensor w: .*leave a gap: the first tensor starts at 0"),
    ({"w": F32([1], 0, 4)}, bytes(8), r"the tensors end at byte \d+, the file has \d+ bytes \(trailing data"),
    ({"w": F32([2], 0, 8)}, bytes(4), r"truncated: tensor w ends at byte"),
])
def test_read_safetensors_rejects_inconsistent_headers(tmp_path, header, data, match):
    f = write_st(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ValueError, match=r"bad\.safetensors: .*" + match):
        M.read_safetensors(f)


def test_read_safetensors_accepts_what_the_package_writes(tmp_path):
    """The checks pass a file with metadata, zero-size tensors and a padded header (written by the package)."""
    st = pytest.importorskip("safetensors.torch")
    ts = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.zeros(0, 4),
          "c": torch.ones(3, dtype=torch.int64)}
    st.save_file(ts, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    got = M.read_safetensors(tmp_path / "ok.safetensors")
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)


def test_read_safetensors_header_length_beyond_the_file(tmp_path):
    f = tmp_path / "big.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match=r"big\.safetensors: truncated or not a safetensors file \(header length"):
        M.read_safetensors(f)


# ----------------------------------------------------------------------------------------------
# config.json


LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=10, num_hidden_layers=1, num_attention_heads=4,
             hidden_size=32, intermediate_size=8)
GPT2 = dict(architectures=["GPT2LMHeadModel"], vocab_size=10, n_layer=1, n_head=4, n_embd=32, n_positions=16)


@pytest.mark.parametrize("config,match", [
    ([1, 2], r"expected a JSON object, got an array"),
    ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, r"missing required key 'hidden_size'"),
    ({k: v for k, v in LLAMA.items() if k != "vocab_size"}, r"missing required key 'vocab_size'"),
    ({k: v for k, v in GPT2.items() if k != "n_positions"}, r"missing required key 'n_positions'"),
    (LLAMA | {"num_attention_heads": 0}, r"num_attention_heads is 0, expected a positive integer"),
    (LLAMA | {"num_attention_heads": -4}, r"num_attention_heads is -4, expected a positive integer"),
    (GPT2 | {"n_head": 0}, r"n_head is 0, expected a positive integer"),
    (LLAMA | {"num_key_value_heads": 3}, r"num_key_value_heads = 3 does not divide num_attention_heads = 4"),
    (LLAMA | {"hidden_size": 30}, r"hidden_size = 30 is not divisible by num_attention_heads = 4 \(and no head_dim\)"),
    (GPT2 | {"n_embd": 30}, r"n_embd = 30 is not divisible by n_head = 4"),
    (LLAMA | {"hidden_size": 32.0}, r"hidden_size is 32\.0, expected a positive integer"),
    (LLAMA | {"vocab_size": "10"}, r"vocab_size is \"10\", expected a positive integer"),
    (LLAMA | {"intermediate_size": True}, r"intermediate_size is true, expected a positive integer"),
    (LLAMA | {"head_dim": 7}, r"head size 7 is odd"),
    (LLAMA | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope scaling llama3 needs numbers for low"),
    (LLAMA | {"rope_scaling": "llama3"}, r"rope_scaling / rope_parameters is not an object"),
    (LLAMA | {"architectures": [{"x": 1}]}, r"architecture .* is not supported"),
])
def test_config_errors(tmp_path, tiny_llama, config, match):
    d = tmp_path / "ckpt"
    tiny_llama.save_pretrained(d)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ckpt/config\.json: " + match):
        M.GPT.from_pretrained(d)


def test_config_head_dim_given_allows_any_width():
    cfg = M.config_from_hf(LLAMA | {"hidden_size": 30, "head_dim": 8, "num_key_value_heads": None}, "config.json")
    assert (cfg.n_embd, cfg.head_dim, cfg.n_kv_head) == (30, 8, 4)


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints: the index


@pytest.mark.parametrize("index,match", [
    ([1], r"model\.safetensors\.index\.json: expected a JSON object, got an array"),
    ({"metadata": {}}, r"model\.safetensors\.index\.json: no \"weight_map\" object"),
    ({"weight_map": ["model.safetensors"]}, r"model\.safetensors\.index\.json: no \"weight_map\" object"),
    ({"weight_map": {"a": "../x.safetensors"}}, r"file name \"\.\./x\.safetensors\" is not a relative path inside"),
    ({"weight_map": {"a": "/etc/passwd"}}, r"file name \"/etc/passwd\" is not a relative path inside"),
    ({"weight_map": {"a": "sub/../../x"}}, r"file name \"sub/\.\./\.\./x\" is not a relative path"),
    ({"weight_map": {"a": 3}}, r"file name 3 is not a relative path"),
])
def test_index_errors(tmp_path, tiny_llama, index, match):
    d = tmp_path / "ckpt"
    tiny_llama.save_pretrained(d)
    (tmp_path / "x.safetensors").write_bytes((d / "model.safetensors").read_bytes())  # what ../x would reach
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match):
        M.GPT.from_pretrained(d)


def test_index_shard_in_a_subdirectory_loads(tmp_path, tiny_llama):
    d = tmp_path / "ckpt"
    tiny_llama.save_pretrained(d)
    (d / "sub").mkdir()
    (d / "model.safetensors").rename(d / "sub" / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "sub/model.safetensors"}}))
    m = M.GPT.from_pretrained(d)
    assert torch.equal(m.lm_head.weight, tiny_llama.lm_head.weight)


def test_non_finite_weights_are_refused(tmp_path, tiny_llama):
    d = tmp_path / "ckpt"
    tiny_llama.save_pretrained(d)
    ts = {k: v.clone() for k, v in M.read_safetensors(d / "model.safetensors").items()}
    ts["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    M.write_safetensors(d / "model.safetensors", ts)
    with pytest.raises(ValueError, match=r"ckpt: tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN or infinite"):
        M.GPT.from_pretrained(d)


# ----------------------------------------------------------------------------------------------
# tokenizer.json


def test_tokenizer_json_errors(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    files = M.Tokenizer.byte_level().save_files()
    for name, text in files.items():
        (d / name).write_text(text)
    tj = json.loads(files["tokenizer.json"])
    M.Tokenizer.from_dir(d)  # the unmodified files load
    cases = [([1, 2], r"expected a JSON object, got an array"),
             (tj | {"model": "BPE"}, r"\"model\" is \"BPE\", expected an object"),
             (tj | {"model": {k: v for k, v in tj["model"].items() if k != "vocab"}}, r"model\.vocab is missing"),
             (tj | {"model": tj["model"] | {"vocab": ["a", "b"]}}, r"model\.vocab is missing or not an object"),
             (tj | {"model": tj["model"] | {"vocab": {"a": "0"}}}, r"model\.vocab is missing or not an object"),
             (tj | {"added_tokens": [{"content": "<x>"}]}, r"added_tokens is not a list of objects"),
             (tj | {"model": tj["model"] | {"merges": [1]}}, r"model\.merges is not a list")]
    for bad, match in cases:
        (d / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"tok/tokenizer\.json: " + match):
            M.Tokenizer.from_dir(d)
    (d / "tokenizer.json").write_text(files["tokenizer.json"])
    (d / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tok/tokenizer_config\.json: expected a JSON object"):
        M.Tokenizer.from_dir(d)


# ----------------------------------------------------------------------------------------------
# Names that look like local paths are local paths


def test_missing_local_looking_paths_are_not_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub must not be asked
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    (tmp_path / "runs").mkdir()
    names = ("./nope", "runs/sft", "org/model.gguf", "org/config.json", "~/no-such-dir-here/x", str(tmp_path / "x"))
    for name in names:
        for load in (M.GPT.from_pretrained, M.Tokenizer.from_pretrained):
            with pytest.raises(FileNotFoundError, match=r"no such file or directory: /\S*" + name.split("/")[-1]):
                load(name)
    assert not (tmp_path / "hf_home").exists()


def test_hub_id_that_fails_says_no_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(OSError, match=r"org/name: cannot download .*\(and no local path org/name exists\)"):
        M.GPT.from_pretrained("org/name")


# ----------------------------------------------------------------------------------------------
# Hub download: the token stays with the hub; shard names stay in the cache


class _Server:
    """A local HTTP server in a thread that records (path, Authorization) and answers with `respond`."""

    def __init__(self, respond):
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                code, headers, body = respond(self.path)
                self.send_response(code)
                for k, v in ({"Content-Length": str(len(body))} | headers).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    servers = []
    yield lambda respond: servers.append(_Server(respond)) or servers[-1]
    for s in servers:
        s.close()


def test_hub_token_not_sent_to_another_host_after_redirect(hub_env, tmp_path, tiny_llama, monkeypatch):
    src = tmp_path / "src"
    tiny_llama.save_pretrained(src, tokenizer=M.Tokenizer.byte_level())

    def files(path):
        f = src / path.rsplit("/", 1)[1]
        return (200, {}, f.read_bytes()) if f.is_file() else (404, {}, b"")
    cdn = hub_env(files)  # another port: another host as far as the token is concerned

    def hub(path):  # weights go to the CDN, config.json through a same-host redirect, the rest served here
        name = path.rsplit("/", 1)[1]
        if name.endswith(".safetensors"):
            return 302, {"Location": f"{cdn.url}/blobs/{name}"}, b""
        if name == "config.json" and not path.startswith("/api/"):
            return 307, {"Location": f"/api/cached/{name}"}, b""
        return files(path)
    origin = hub_env(hub)
    monkeypatch.setenv("HF_ENDPOINT", origin.url)
    m = M.GPT.from_pretrained("org/tiny")
    assert torch.equal(m.lm_head.weight, tiny_llama.lm_head.weight)
    assert cdn.requests == [("/blobs/model.safetensors", None)]  # the CDN never sees the token
    assert ("/api/cached/config.json", "Bearer hf_secret123") in origin.requests  # same host: it keeps it
    assert all(auth == "Bearer hf_secret123" for _, auth in origin.requests)


def test_hub_index_with_a_shard_outside_the_cache_is_refused(hub_env, tmp_path, monkeypatch):
    index = json.dumps({"weight_map": {"a": "../evil"}}).encode()
    config = json.dumps(LLAMA).encode()
    bodies = {"config.json": config, "model.safetensors.index.json": index}
    hub = hub_env(lambda path: (200, {}, bodies[path.rsplit("/", 1)[1]]) if path.rsplit("/", 1)[1] in bodies
                  else (404, {}, b""))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: file name \"\.\./evil\" is not a relative"):
        M.GPT.from_pretrained("org/evil")
    assert not any("evil" in p.rsplit("/", 1)[1] for p, _ in hub.requests)
    assert not (tmp_path / "hf_home" / "model.py" / "org--evil" / "evil").exists()
    with pytest.raises(ValueError, match=r"not a hub id"):
        M.hub_download("org/..")


# ----------------------------------------------------------------------------------------------
# GGUF: corrupt headers and records


def _tiny_gguf(tmp_path, **kw):
    pytest.importorskip("gguf")
    from test_model import write_tiny_gguf
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, seed=30, **kw)
    return path


def _set_kv(path, key, fmt, value):
    """Overwrite the value of a scalar metadata key in place (same type, same size)."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key) + 4  # key length, key, value type
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def _rename_kv(path, key, new):
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8
    data[at:at + len(key)] = new.encode()
    path.write_bytes(bytes(data))


def test_gguf_corrupt_metadata(tmp_path):
    path = _tiny_gguf(tmp_path)
    clean = path.read_bytes()
    cases = [(lambda: _set_kv(path, "llama.attention.head_count_kv", "<I", 3),
              r"llama\.attention\.head_count_kv = 3 does not divide llama\.attention\.head_count = 4"),
             (lambda: _set_kv(path, "llama.attention.head_count", "<I", 0),
              r"llama\.attention\.head_count is 0, expected a positive integer"),
             (lambda: _rename_kv(path, "llama.embedding_length", "llama.embedding_lengtX"),
              r"missing required key 'llama\.embedding_length'"),
             (lambda: _rename_kv(path, "token_embd.weight", "token_embd.weighX"), r"no 2-d tensor token_embd\.weight")]
    for corrupt, match in cases:
        path.write_bytes(clean)
        corrupt()
        with pytest.raises(ValueError, match=r"t\.gguf: " + match):
            M.GPT.from_pretrained(path)


def test_gguf_corrupt_tensor_records(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = _tiny_gguf(tmp_path, types=[gguf.GGMLQuantizationType.Q4_0])
    clean = path.read_bytes()
    name = "blk.0.ffn_up.weight"
    rec = clean.index(name.encode() + struct.pack("<I", 2)) + len(name)  # n_dims = 2, dims, type, offset
    data = bytearray(clean)
    struct.pack_into("<I", data, rec, 7)  # 7 dimensions
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"t\.gguf: corrupt GGUF header: tensor blk\.0\.ffn_up\.weight has 7 dim"):
        M.GGUFFile(path)
    data = bytearray(clean)
    struct.pack_into("<QQ", data, rec + 4, 63, 1)  # 63 x 1 values: not whole blocks of 32
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor blk\.0\.ffn_up\.weight: \d+ values are not whole blocks of 32"):
        M.GGUFFile(path).tensor(name)


def test_gguf_alignment_zero(tmp_path):
    path = _tiny_gguf(tmp_path)
    assert M.GGUFFile(path).metadata["llama.block_count"] == 2
    _rename_kv(path, "llama.block_count", "general.alignment")  # a uint32 key of the same length
    _set_kv(path, "general.alignment", "<I", 0)
    with pytest.raises(ValueError, match=r"t\.gguf: general\.alignment is 0, expected a positive integer"):
        M.GGUFFile(path)


def test_gguf_truncated_anywhere_is_a_clear_error(tmp_path):
    path = _tiny_gguf(tmp_path)
    data = path.read_bytes()
    start = M.GGUFFile(path).data_start
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, start, max(1, start // 40))) + list(range(start, len(data), max(1, len(data) // 20))):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\.gguf: (not a GGUF file|truncated)"):
            M.GPT.from_pretrained(cut)
