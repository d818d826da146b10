"""Making validated manifests cheap: a fast path for plain YAML (`plainyaml`), a cache of
validated manifests (`mcache`) and forked workers for large directories (`worker`). None of
them changes what a manifest means: each is checked against the full loader by the tests."""
