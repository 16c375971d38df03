"""Shared value rules (kaito.presets.validate): Kubernetes names and downloadable URLs."""

import pytest

from kaito.presets.validate import dns_label_problem, dns_subdomain_problem, http_url_problem


@pytest.mark.parametrize("value,letter_first,max_len,words", [
    ("My_Workspace!", False, 63, "not a DNS-1123 label"),
    ("ws-", False, 63, "not a DNS-1123 label"),
    ("a" * 64, False, 63, "at most 63"),
    ("abc", False, 2, "at most 2"),
    ("9lives", True, 63, "start with a letter"),
    ("", False, 63, "required"),
    (None, False, 63, "required"),
    (7, False, 63, "required"),
    ("a.b", False, 63, "not a DNS-1123 label"),
])
def test_bad_labels(value, letter_first, max_len, words):
    problem = dns_label_problem(value, max_len, letter_first=letter_first)
    assert problem and words in problem


@pytest.mark.parametrize("value", ["a", "workspace-phi-3-mini", "a" * 63, "9lives"])
def test_good_labels(value):
    assert dns_label_problem(value) is None


def test_subdomains_allow_dots_but_not_empty_parts():
    assert dns_subdomain_problem("phi-3.5-mini-instruct") is None
    assert "not a DNS-1123 name" in dns_subdomain_problem("phi..3")
    assert "at most 63" in dns_subdomain_problem("a" * 64, 63)


@pytest.mark.parametrize("url,words", [
    ("not a url", "only http:// and https://"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("ftp://host/x", "scheme 'ftp'"),
    ("https://", "host"),
    ("http://host:port/x", "not a valid URL"),
    ("https://host/a b", "not a valid URL"),
    ("", "empty"),
])
def test_bad_urls(url, words):
    problem = http_url_problem(url)
    assert problem and words in problem


def test_good_urls():
    url = "https://huggingface.co/datasets/x/resolve/main/data/train.parquet?download=true"
    assert http_url_problem(url) is None
    assert http_url_problem("http://127.0.0.1:8000/data.jsonl") is None


def test_redact_drops_credentials_and_query_keeps_host_port_path():
    from kaito.presets.validate import redact

    assert redact("https://u:p@h.net:8443/a/b.parquet?sig=1") == "https://h.net:8443/a/b.parquet?..."
    assert redact("http://[::1]:5000/v2/x/blobs/uploads/abc?_state=tok") == "http://[::1]:5000/v2/x/blobs/uploads/abc?..."
    assert redact("https://h.net/p") == "https://h.net/p"
    import httpx
    assert redact(httpx.URL("https://tok@r.io/v2/?q=1")) == "https://r.io/v2/?..."


def test_is_loopback():
    from kaito.presets.validate import is_loopback

    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost:5000") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.io") and not is_loopback("10.0.0.1:5000")


def test_validation_problem_names_the_field_path():
    from kaito.presets.errors import validation_problem

    assert validation_problem({"loc": ("adapters", 0, "source"), "msg": "Value error, bad"}) == "adapters[0].source: bad"
    assert validation_problem({"loc": (), "msg": "x"}, root="settings") == "settings: x"
