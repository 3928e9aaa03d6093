// OpenSSL's message-digest API (EVP), used for SHA-256 on platforms without CryptoKit.
#include <openssl/evp.h>
