"""Request cases generated from an app's own OpenAPI document: valid by its schema, or one mutation away.

Used by tests/runtime/test_fuzz.py. Why not only schemathesis: its hypothesis-based generation of our
request models costs 10-75 ms a case on this machine (nested messages, tools, response formats), so 5,000
cases would take minutes; this walker draws a case in well under a millisecond from the same schema
(types, enums, bounds, required fields, $refs), seeded and reproducible. The test runs a schemathesis
sample next to it, so both generators see every operation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

STRINGS = ["", " ", "hi", "What is a GPU?", "\u0000", "😀" * 5, "<|end|>", "<|endoftext|>", "../../etc/passwd",
           "\ud7ff\ue000", "x" * 300, "tiny-phi-3", "alpha", "user", "assistant", "system", "text", "json_object"]
NUMBERS = [0, 1, -1, 2, 0.5, 1e-40, 1.4e-45, 1e20, -1e20, 2**63, -(2**63), 2**64, 1e308, 3]


@dataclass
class Operation:
    method: str
    path: str  # with {params}
    body: dict | None  # the request body's JSON schema, $refs unresolved
    params: list[dict]  # path and query parameters


@dataclass
class Case:
    op: Operation
    url: str
    content: bytes | None
    headers: dict
    valid: bool  # drawn to satisfy the schema (the server may still refuse it on its own rules)


class SchemaFuzzer:
    def __init__(self, openapi: dict, seed: int, max_str: int = 40):
        self.doc, self.rng, self.max_str = openapi, random.Random(seed), max_str
        self.operations = [Operation(m.upper(), path, _json_body(spec), spec.get("parameters", []))
                           for path, item in openapi["paths"].items() for m, spec in item.items()]

    # ---- schema walking -----------------------------------------------------------------
    def _resolve(self, s: dict) -> dict:
        while "$ref" in s:
            node: Any = self.doc
            for part in s["$ref"].lstrip("#/").split("/"):
                node = node[part]
            s = node
        return s

    def value(self, schema: dict, depth: int = 0) -> Any:
        """A value that satisfies `schema` (as far as JSON Schema's keywords used by pydantic go)."""
        s, r = self._resolve(schema), self.rng
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self.value(r.choice(s[key]), depth)
        if "allOf" in s:
            return self.value(s["allOf"][0], depth)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return r.choice(s["enum"])
        kind = s.get("type") or r.choice(["string", "integer", "boolean", "null"])
        if isinstance(kind, list):
            kind = r.choice(kind)
        if kind == "object":
            return self._object(s, depth)
        if kind == "array":
            lo = s.get("minItems", 0)
            hi = min(s.get("maxItems", lo + 3), lo + 3)
            items = s.get("items", {})
            return [self.value(items, depth + 1) for _ in range(r.randint(lo, hi))] if depth < 6 else []
        if kind == "string":
            lo, hi = s.get("minLength", 0), min(s.get("maxLength", self.max_str), self.max_str)
            text = r.choice(STRINGS)[:hi] if r.random() < 0.5 else "".join(r.choice("ab c😀\n") for _ in range(r.randint(lo, max(lo, hi))))
            return text if len(text) >= lo else text + "a" * (lo - len(text))
        if kind in ("integer", "number"):
            return self._number(s, kind == "integer")
        if kind == "boolean":
            return r.random() < 0.5
        return None

    def _object(self, s: dict, depth: int) -> dict:
        props, required = s.get("properties", {}), set(s.get("required", []))
        out = {}
        for name, sub in props.items():
            if name in required or (depth < 4 and self.rng.random() < 0.25):
                out[name] = self.value(sub, depth + 1)
        return out

    def _number(self, s: dict, integer: bool) -> float | int:
        r = self.rng
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        lo_ok = lo if "minimum" in s else (lo + (1 if integer else 1e-6) if lo is not None else None)
        hi_ok = hi if "maximum" in s else (hi - (1 if integer else 1e-6) if hi is not None else None)
        picks = [x for x in (lo_ok, hi_ok) if x is not None] + [x for x in NUMBERS if (lo_ok is None or x >= lo_ok) and (hi_ok is None or x <= hi_ok)]
        if lo_ok is not None and hi_ok is not None:
            picks.append(r.uniform(lo_ok, hi_ok))
        v = r.choice(picks) if picks else 0
        return int(v) if integer else v

    # ---- mutations: one step outside the schema -------------------------------------------
    def mutate(self, body: Any, schema: dict) -> Any:
        """Break one thing: a required field gone, an unknown field, a wrong type, an out-of-range number."""
        s, r = self._resolve(schema), self.rng
        if not isinstance(body, dict) or not body or r.random() < 0.15:
            return r.choice([None, [], "text", 7, {"unknown_field": 1}, [body]])
        props = s.get("properties", {})
        key = r.choice(list(body))
        roll = r.random()
        if roll < 0.2 and s.get("required"):
            body.pop(r.choice(s["required"]), None)
        elif roll < 0.3:
            body[r.choice(["unknown_field", "tools", "functions", "best_of"])] = r.choice(NUMBERS + STRINGS)
        elif roll < 0.6 and isinstance(body[key], dict) and key in props:
            body[key] = self.mutate(body[key], self._object_branch(props[key]))
        else:
            body[key] = r.choice([None, True, "", "NaN", [], {}, [1, "a"], 1e309 if r.random() < 0.1 else -1e20,
                                  -(2**70), 2**70, 1.5, "x" * 2000, {"$ref": "#"}])
        return body

    def _object_branch(self, schema: dict) -> dict:
        s = self._resolve(schema)
        for key in ("anyOf", "oneOf"):
            for sub in s.get(key, []):
                if self._resolve(sub).get("type") == "object":
                    return self._resolve(sub)
        return s

    # ---- cases ------------------------------------------------------------------------------
    def case(self, op: Operation) -> Case:
        r = self.rng
        path = op.path
        for p in op.params:
            if p.get("in") == "path":
                path = path.replace("{" + p["name"] + "}", r.choice(["tiny-phi-3", "alpha", "nope", "a%2Fb", "%00", "x" * 200]))
        valid = r.random() < 0.55
        headers = {"content-type": "application/json"}
        if op.body is None:
            return Case(op, path, None, headers, valid)
        body = self.value(op.body)
        if not valid:
            body = self.mutate(body, op.body)
        content = json.dumps(body, allow_nan=True).encode()
        if not valid and r.random() < 0.08:  # not JSON at all, or a body of the wrong kind
            content = r.choice([b"{", b"\xff\xfe", b"null", b'{"a":NaN}', b"[" * 3000 + b"]" * 3000, content[: len(content) // 2]])
            headers["content-type"] = r.choice(["application/json", "text/plain"])
        return Case(op, path, content, headers, valid)


def _json_body(spec: dict) -> dict | None:
    content = spec.get("requestBody", {}).get("content", {})
    media = content.get("application/json")
    return media.get("schema") if media else None
