"""kaito.image_builder.oci: a small pure OCI library (values, sources, sinks).

Modelled on go-containerregistry: immutable `Layer` and `Image` values with a
functional `append`, separate sources and sinks (`layout`, `remote`), and HTTP
in two modules only (`transport`, the layered client, and `remote`, the
distribution API on it). Called by kaito.image_builder's build, pull, transfer
and CLI layers; other packages use kaito.image_builder's public face, except
`reference`/`errors.BadReference`, which tuning and the operator's admission
use to check an image name before any work.
"""

from kaito.image_builder.oci.errors import OCIError, RegistryError, AuthError, VerificationError, UnsafeLayer
from kaito.image_builder.oci.reference import Reference, parse_reference
from kaito.image_builder.oci.values import Descriptor
from kaito.image_builder.oci.layer import Layer, TarEntry
from kaito.image_builder.oci.image import Image, append, empty_image

__all__ = [
    "AuthError",
    "Descriptor",
    "Image",
    "Layer",
    "OCIError",
    "Reference",
    "RegistryError",
    "TarEntry",
    "UnsafeLayer",
    "VerificationError",
    "append",
    "empty_image",
    "parse_reference",
]
