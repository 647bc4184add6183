"""``python -m edgerank.serve`` for more clients (issue 43): llama.cpp's /reranking routes,
LiteLLM's infinity/ provider (and its cohere/ and jina_ai/ readers beside it), the
playground in headless Chromium, browsers on other origins (CORS), HEAD, rank_fields, and
the docs' claims. Each against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import ast
import os
import re
import shutil

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.test_serve import AUTH, DOCS, KEY, QUERY, ROOT, free_port, post, reference, reranker, serving, url  # noqa: E402

__all__ = ["reranker", "url"]  # module-scoped fixtures, shared with test_serve.py's
pytestmark = pytest.mark.slow  # real weights, as in test_serve.py


def ranked(results: list[dict], score: str = "relevance_score") -> list[tuple[int, float]]:
    return [(x["index"], x[score]) for x in results]


# ---- 6. llama.cpp's routes -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/reranking", "/v1/reranking"])
def test_llama_cpp_reranking_routes(url, path):
    """llama-server registers /rerank, /v1/rerank, /reranking and /v1/reranking for one handler."""
    r = post(url, path, {"model": "some.gguf", "query": QUERY, "top_n": 3, "documents": DOCS})
    assert r.status_code == 200, r.text
    assert ranked(r.json()["results"]) == reference(QUERY, DOCS, 3)
    assert r.json()["usage"]["prompt_tokens"] > 0
    tei = post(url, path, {"query": QUERY, "texts": DOCS})  # llama.cpp answers TEI's body there too
    assert ranked(tei.json(), "score") == reference(QUERY, DOCS)


# ---- 7. LiteLLM: infinity/, and cohere/ and jina_ai/ beside it -------------------------------

def test_infinity_route_answers_infinitys_shape(url):
    """Infinity's /rerank answer: each document a bare string (null unless asked for)."""
    r = post(url, "/infinity/rerank", {"model": "m", "query": QUERY, "documents": DOCS, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "rerank" and body["model"] == "m" and body["usage"]["total_tokens"] > 0
    assert ranked(body["results"]) == reference(QUERY, DOCS)
    assert [x["document"] for x in body["results"]] == [DOCS[x["index"]] for x in body["results"]]
    plain = post(url, "/infinity/rerank", {"query": QUERY, "documents": DOCS, "top_n": 2}).json()
    assert ranked(plain["results"]) == reference(QUERY, DOCS, 2)
    assert [x["document"] for x in plain["results"]] == [None, None]


@pytest.fixture(scope="module")
def litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    return pytest.importorskip("litellm")


@pytest.mark.parametrize("provider,path,top_k", [
    ("infinity/edgerank", "/infinity", 3), ("cohere/rerank-v3.5", "", 3),
    ("jina_ai/jina-reranker-v2-base-multilingual", "", 3), ("hosted_vllm/edgerank", "", 3),
    ("huggingface/edgerank", "", None),  # TEI's body: no top_n in it, every document comes back
])
def test_litellm_providers_read_the_server(url, litellm, provider, path, top_k):
    """LiteLLM's own client: infinity/ with ``api_base`` ending in /infinity (it reads each
    document as a bare string), the others at the server's root (they read ``{"text"}``)."""
    resp = litellm.rerank(model=provider, query=QUERY, documents=DOCS, top_n=3, return_documents=True,
                          api_base=url + path, api_key=KEY)
    assert [(x["index"], x["relevance_score"]) for x in resp.results] == reference(QUERY, DOCS, top_k)
    assert [x["document"]["text"] for x in resp.results] == [DOCS[x["index"]] for x in resp.results]


# ---- 9. rank_fields: a warning, as max_tokens_per_doc gets -----------------------------------

@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
def test_rank_fields_is_answered_with_a_warning(url, path):
    docs = [{"text": d, "title": "t"} for d in DOCS]
    r = post(url, path, {"model": "m", "query": QUERY, "documents": docs, "rank_fields": ["title", "text"],
                         "max_chunks_per_doc": 2})
    assert r.status_code == 200
    warnings = r.json()["meta"]["warnings"]
    assert any(w.startswith("rank_fields is ignored") for w in warnings), warnings
    assert any(w.startswith("max_chunks_per_doc is ignored") for w in warnings), warnings
    assert ranked(r.json()["results"]) == reference(QUERY, DOCS)
    quiet = post(url, path, {"model": "m", "query": QUERY, "documents": DOCS})
    assert quiet.json()["meta"]["warnings"] == []


# ---- 10. HEAD wherever GET works; CORS only when asked for -----------------------------------

@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics", "/"])
def test_head_answers_wherever_get_does(url, path):
    get, head = httpx.get(url + path, headers=AUTH), httpx.head(url + path, headers=AUTH)
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # its counters move between the two calls
        assert head.headers["content-length"] == get.headers["content-length"]


def preflight(base: str, origin: str) -> httpx.Response:
    return httpx.options(base + "/v1/rerank", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_by_default(url):
    r = preflight(url, "http://app.example")
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = post(url, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={**AUTH, "Origin": "http://app.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origin_lets_that_origin_call(reranker):
    origin = "http://app.example:3000"
    with serving(reranker, api_key=KEY, cors_origins=[origin]) as (base, _):
        ok = preflight(base, origin)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin
        assert {"authorization", "content-type"} <= set(ok.headers["access-control-allow-headers"].lower().split(", "))
        assert "POST" in ok.headers["access-control-allow-methods"]
        r = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={**AUTH, "Origin": origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "Retry-After" in r.headers["access-control-expose-headers"]
        denied = post(base, "/v1/rerank", {"query": QUERY, "documents": DOCS}, headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin  # readable
        other = preflight(base, "http://elsewhere.example")
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_command_line_reads_cors_origin_and_read_timeout():
    from edgerank.serve.__main__ import build_parser, settings_from

    args = build_parser().parse_args(["--cors-origin", "http://a.example", "--cors-origin", "*",
                                      "--read-timeout", "7.5"])
    _, settings = settings_from(args)
    assert settings.cors_origins == ["http://a.example", "*"] and settings.read_timeout_s == 7.5
    _, default = settings_from(build_parser().parse_args([]))
    assert default.cors_origins == [] and default.read_timeout_s == 30.0


# ---- 8. the playground in headless Chromium (and CORS from a real browser) -------------------

def chromium_path() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def rank_and_wait(page) -> None:
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('error').textContent !== '' || "
                           "!document.getElementById('table').hidden")


def shown(page) -> list[tuple[int, float]]:
    rows = page.eval_on_selector_all("#table tbody tr", "rows => rows.map(r => [r.cells[2].textContent, "
                                                        "r.cells[1].textContent])")
    return [(int(i), float(s)) for i, s in rows]


def test_playground_clears_after_an_error_and_reads_an_empty_top_k(url, browser):
    page = browser.new_page()
    posted: list[dict] = []
    page.on("request", lambda req: posted.append(req.post_data_json) if req.method == "POST" else None)
    page.goto(url + "/")
    page.fill("#key", KEY)
    rank_and_wait(page)
    expected = reference(QUERY, DOCS)
    assert [i for i, _ in shown(page)] == [i for i, _ in expected]
    assert all(abs(s - e) <= 5e-5 for (_, s), (_, e) in zip(shown(page), expected))  # scores as .toFixed(4)
    page.fill("#query", "")  # the issue: clear the query, click Rank
    rank_and_wait(page)
    assert page.inner_text("#error").startswith("422: query")
    assert page.eval_on_selector("#table", "t => [t.hidden, t.tBodies[0].rows.length]") == [True, 0]
    assert page.inner_text("#summary") == ""
    page.fill("#query", QUERY)
    page.fill("#k", "")  # an empty Top K: every document, no top_n sent
    posted.clear()
    rank_and_wait(page)
    assert posted and all("top_n" not in body for body in posted), posted
    text = page.inner_text("body")
    assert "NaN" not in text and "kept: #1 of all" in text
    assert [i for i, _ in shown(page)] == [i for i, _ in expected]
    page.close()


def test_a_browser_on_another_origin_needs_cors_origin(reranker, browser):
    """The playground loaded from http://localhost:PORT calls http://127.0.0.1:PORT (another
    origin, with an Authorization header: a preflight): refused by the browser unless the
    server names that origin."""
    for allowed in (False, True):
        port = free_port()
        origin = f"http://localhost:{port}"
        with serving(reranker, port=port, api_key=KEY, cors_origins=[origin] if allowed else []) as (base, _):
            page = browser.new_page()
            page.goto(origin + "/")
            result = page.evaluate("""async ([target, key, query, docs]) => {
                try {
                  const r = await fetch(target + "/v1/rerank", {method: "POST", body: JSON.stringify({query, documents: docs}),
                    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key}});
                  return [r.status, (await r.json()).results.map((x) => x.index)];
                } catch (e) { return ["refused", String(e)]; }
            }""", [base, KEY, QUERY, DOCS])
            page.close()
        if allowed:
            assert result == [200, [i for i, _ in reference(QUERY, DOCS)]]
        else:
            assert result[0] == "refused", result


# ---- 11. the docs; and the function-length rule (issue 41) -----------------------------------

SERVE_MD = (ROOT / "docs" / "serve.md").read_text(encoding="utf-8")


def test_docs_name_the_flags_of_each_load_figure():
    """Each load figure says which server flags it was measured with, the defaults among them."""
    load = SERVE_MD[SERVE_MD.index("## Load"):]
    rows = [line for line in load.splitlines() if line.startswith("| ") and "× 200" in line]
    flags = [row.split(" | ")[0] for row in rows]
    assert any("--max-queue 32 --timeout 600" in f for f in flags), flags
    assert any("default flags" in f and "--max-queue 16 --timeout 60" in f for f in flags), flags
    assert "640 × 200" in load and "× 429" in load


def test_docs_screenshot_scores_are_the_readmes_example():
    """The scores the docs give for the screenshot are the ones `python -m edgerank` prints
    for the README's example on the CPU the README names for its output."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = [float(s) for s in re.findall(r"^\s+\d\s+(-?\d\.\d{4})\s+\d\s", readme, re.M)]
    paragraph = SERVE_MD[SERVE_MD.index("![the playground"):SERVE_MD.index("## Load")]
    quoted = [float(s.replace("−", "-")) for s in re.findall(r"[−-]?\d\.\d{4}", paragraph)][:6]
    assert len(quoted) == 6 and quoted == sorted(quoted, reverse=True)
    assert len(table) == 6 and quoted == table, (quoted, table)


def test_no_function_in_the_server_is_over_60_lines():
    long = []
    for path in (ROOT / "edgerank" / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} {lines} lines")
    assert not long, long
