"""kaito.image_builder: presets packaged into OCI images and ModelPack artifacts; push, pull, inspect.

Public face used by tuning (`build_adapter` for the adapter push, `pull` for
image data inputs) and the runtime (`pull` of adapter images). The CLI
(`kaito image ...`, which the operator's init containers run) imports the
modules themselves, and tuning and the operator's admission check image names
with `oci.reference` early. The OCI library underneath is
`kaito.image_builder.oci` (values, layout, transport, remote). Imports neither
torch nor transformers.
"""

from kaito.image_builder.build import BuildResult, build_adapter, build_preset, preset_weights
from kaito.image_builder.oci import Image, Layer, Reference, append, empty_image, parse_reference
from kaito.image_builder.oci.errors import AuthError, OCIError, RegistryError, UnsafeLayer, VerificationError
from kaito.image_builder.oci.extract import ExtractLimits
from kaito.image_builder.pull import PullResult, pull
from kaito.image_builder.transfer import Connection, PushResult, copy, inspect, read_image, write_image


def push(image: Image, ref, *, auth_file=None, insecure=None, **kw) -> PushResult:
    """Write an Image value to a registry or layout reference."""
    with Connection(auth_file, insecure) as conn:
        return write_image(image, ref, conn, **kw)


def push_dir(
    directory, ref, *, prefix: str = "data", annotations=None, auth_file=None, insecure=None, **kw
) -> PushResult:
    """Push every file of `directory` as one layer under `/prefix` (a generic data image)."""
    layer = Layer.from_dir(directory, prefix)
    img = append(empty_image(), [layer], annotations={"sh.kaito.content.root": prefix, **(annotations or {})})
    return push(img, ref, auth_file=auth_file, insecure=insecure, **kw)


__all__ = [
    "AuthError",
    "BuildResult",
    "Connection",
    "ExtractLimits",
    "Image",
    "Layer",
    "OCIError",
    "PullResult",
    "PushResult",
    "Reference",
    "RegistryError",
    "UnsafeLayer",
    "VerificationError",
    "append",
    "build_adapter",
    "build_preset",
    "copy",
    "empty_image",
    "inspect",
    "parse_reference",
    "preset_weights",
    "pull",
    "push",
    "push_dir",
    "read_image",
    "write_image",
]
