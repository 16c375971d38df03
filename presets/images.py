"""Names and rules that the image builder, the operator and tuning share about images.

One home for: the OCI digest grammar (every digest that reaches a path or a
URL is checked with `digest_problem`/`check_digest` where it enters:
kaito.image_builder's descriptors, layouts and references, tuning's image
inputs), and the names of a preset's image, its ModelPack weights artifact
and the runtime base (`preset_image`, `modelpack_image`, `base_image`), which
kaito.image_builder.build pushes and kaito.operator's renderers pull. (The
runtime names no image: it pulls the adapter references it is given, through
kaito.image_builder.) Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import Optional

from kaito.presets.errors import InvalidInput

# The OCI image spec's registered algorithms (descriptor.md, "Registered algorithms"):
# the encoded part is lowercase hex of exactly the hash's length. Anything else
# (`sha256:../../x`, uppercase hex, a short hex) is refused before it names a file or URL.
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}
DIGEST_PATTERN = r"(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})"
DIGEST_RE = re.compile(rf"^{DIGEST_PATTERN}$")

MODELPACK_SUFFIX = "-weights"  # the ModelPack artifact's repository: kaito-<preset>-weights


def digest_problem(digest: object) -> Optional[str]:
    """None for a valid OCI digest, else what is wrong with it (for an error message)."""
    if not isinstance(digest, str):
        return f"{digest!r} is not a string"
    if DIGEST_RE.match(digest):
        return None
    algo, sep, enc = digest.partition(":")
    if not sep:
        return f"{digest!r} has no '<algorithm>:' prefix"
    if algo not in DIGEST_ALGORITHMS:
        return f"{digest!r} uses algorithm {algo!r}; the registered ones are {', '.join(DIGEST_ALGORITHMS)}"
    want = DIGEST_ALGORITHMS[algo]
    return f"{digest!r} is not {algo}:<{want} lowercase hex digits>"


def is_digest(digest: object) -> bool:
    return digest_problem(digest) is None


def check_digest(digest: object, field: str) -> str:
    """`digest` if valid, else InvalidInput naming `field` (callers with their own error type use digest_problem)."""
    problem = digest_problem(digest)
    if problem:
        raise InvalidInput(f"{field}: digest {problem}")
    return digest  # type: ignore[return-value]


def image_repository(preset: str) -> str:
    """The repository of a preset's image: `kaito-<preset>` (Kaito's naming)."""
    return f"kaito-{preset}"


def modelpack_repository(preset: str) -> str:
    """The repository of a preset's ModelPack weights artifact: `kaito-<preset>-weights`."""
    return f"{image_repository(preset)}{MODELPACK_SUFFIX}"


def image_name(registry: str, repository: str, tag: str) -> str:
    """`<registry>/<repository>:<tag>`, however the registry argument ends."""
    return f"{registry.rstrip('/')}/{repository}:{tag}"


def preset_image(registry: str, preset: str, tag: str) -> str:
    """`<registry>/kaito-<preset>:<tag>`: the runnable preset image (runtime base + weights)."""
    return image_name(registry, image_repository(preset), tag)


def modelpack_image(registry: str, preset: str, tag: str) -> str:
    """`<registry>/kaito-<preset>-weights:<tag>`: the ModelPack artifact holding only the weights.

    The builder pushes it here, the operator's init container pulls it from here.
    """
    return image_name(registry, modelpack_repository(preset), tag)


BASE_REPOSITORY = "kaito-base"  # the runtime image without weights


def base_image(registry: str, version: str) -> str:
    """`<registry>/kaito-base:<version>`: the runtime without weights.

    The image builder builds preset images on it; the operator runs it for ModelPack and
    download-at-start presets and as the puller of its init containers.
    """
    return image_name(registry, BASE_REPOSITORY, version)
