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
