"""Authentication data: the users file, password schemes and SCRAM secrets.

``auth`` sits beside ``protocol`` and ``storage`` and imports neither: it only turns stored
credentials into yes/no answers and keys.  Import from here; the submodules are the detail.
"""

from mailbag.auth.schemes import (
    DEFAULT_ARGON2_PARAMS,
    DEFAULT_SCHEME,
    READABLE_SCHEMES,
    WRITABLE_SCHEMES,
    Argon2Params,
    hash_password,
    needs_rehash,
    sha_crypt,
    split_scheme,
    verify_dummy,
    verify_password,
)
from mailbag.auth.scram import (
    DEFAULT_ITERATIONS,
    MIN_ITERATIONS,
    SCRAM_SCHEME,
    SASLprepError,
    ScramSecrets,
    client_proof_matches,
    decode_saslname,
    encode_saslname,
    make_scram_secrets,
    new_nonce,
    salted_password,
    saslprep,
    server_signature,
)
from mailbag.auth.users import (
    UserDatabase,
    UserExists,
    UserRecord,
    UsersFile,
    authenticate,
    validate_username,
)

__all__ = [
    "DEFAULT_ARGON2_PARAMS",
    "DEFAULT_ITERATIONS",
    "DEFAULT_SCHEME",
    "MIN_ITERATIONS",
    "READABLE_SCHEMES",
    "SCRAM_SCHEME",
    "WRITABLE_SCHEMES",
    "Argon2Params",
    "SASLprepError",
    "ScramSecrets",
    "UserDatabase",
    "UserExists",
    "UserRecord",
    "UsersFile",
    "authenticate",
    "client_proof_matches",
    "decode_saslname",
    "encode_saslname",
    "hash_password",
    "make_scram_secrets",
    "needs_rehash",
    "new_nonce",
    "salted_password",
    "saslprep",
    "server_signature",
    "sha_crypt",
    "split_scheme",
    "validate_username",
    "verify_dummy",
    "verify_password",
]
