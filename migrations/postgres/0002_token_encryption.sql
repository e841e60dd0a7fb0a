-- The id of the key that encrypted the row's access and refresh tokens with AES-256-GCM:
-- the first 8 bytes of SHA-256 over a fixed label and the key, in hex. NULL means the
-- tokens are stored in plaintext.
ALTER TABLE token_sets ADD COLUMN key_id text;
