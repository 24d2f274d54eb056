"""Root key providers behind one port (:class:`phivault.crypto.ports.RootKeyProvider`).

Why several: the embedded shape keeps the root key as Shamir shares held by people (sealed
local keystore); the scaled shape keeps it in an HSM (PKCS#11) or a cloud KMS, where it never
leaves the device. The key ring cannot tell them apart.
"""

from phivault.crypto.providers.awskms import AwsKmsProvider
from phivault.crypto.providers.pkcs11 import Pkcs11Provider
from phivault.crypto.providers.sealed import SealedLocalProvider

__all__ = ["AwsKmsProvider", "Pkcs11Provider", "SealedLocalProvider"]
