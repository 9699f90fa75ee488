# gateway: build, test, lint, demo, bench, install.
# `make test` is what CI runs: it installs the Python packages its tests need into a venv under
# target/ by itself. `make test-vllm` then proves the gateway against a real vLLM (CPU build).

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
# The Python the venvs are made from (3.11 to 3.14: vLLM 0.32 asks for >=3.11,<3.15).
PYTHON ?= python3
# The OpenAI SDK and prometheus_client, pinned by tests/requirements.txt, for the SDK and
# metrics-format tests; the tests run the Python named by GATEWAY_TEST_PYTHON.
TEST_VENV ?= $(TARGET_DIR)/test-venv
# A real vLLM and a tiny model made locally (tests/vllm/setup.sh): 6.3 GB, 7.6 GB while it installs.
VLLM_DIR ?= $(TARGET_DIR)/vllm

# The release build is profile-guided when an llvm-profdata of rustc's LLVM is at hand (rustup's
# llvm-tools, or a distribution's llvm-profdata-N): PGO=auto (the default) uses one if found and
# says so if not, PGO=1 requires one, PGO=0 builds without.
PGO ?= auto
PGO_DIR ?= $(TARGET_DIR)/pgo
LLVM_PROFDATA ?= $(shell bash tests/pgo/profdata.sh)

.PHONY: all build test test-venv test-vllm vllm-setup lint fmt demo bench bench-instructions install install-check clean verify-unit

all: build

# jemalloc (tikv-jemalloc-sys) is built with make: it must not see this make's command-line
# variables (MAKEFLAGS), or `make install DESTDIR=...` would install its library into DESTDIR.
RELEASE_CARGO = env -u MAKEFLAGS -u MFLAGS -u DESTDIR $(CARGO) build --release --locked

# Profile-guided: an instrumented build (in a target directory of its own), a training run
# through it (tests/pgo/train.py; run again only when that build or the script changed), its
# profiles merged, and the release build optimized with them: the code a request runs laid out
# together and optimized for speed, the rest for size.
build:
	@case "$(PGO)" in \
	auto|1|0) ;; \
	*) echo "PGO must be auto, 1 or 0 (got '$(PGO)')"; exit 2 ;; \
	esac
ifeq ($(PGO)$(LLVM_PROFDATA),1)
	@echo "PGO=1, but no llvm-profdata of rustc's LLVM: apt-get install llvm-$$(bash tests/pgo/profdata.sh --major), or rustup component add llvm-tools"; exit 1
endif
ifneq ($(if $(filter 0,$(PGO)),,$(LLVM_PROFDATA)),)
	RUSTFLAGS="$(RUSTFLAGS) -Cprofile-generate=$(PGO_DIR)/profiles" $(RELEASE_CARGO) --bins --target-dir $(PGO_DIR)/target
	@if [ ! -e $(PGO_DIR)/merged.profdata ] || \
	    [ -n "$$(find $(PGO_DIR)/target/release/gateway $(PGO_DIR)/target/release/mock-vllm tests/pgo/train.py -newer $(PGO_DIR)/merged.profdata)" ]; then \
		rm -rf $(PGO_DIR)/profiles && \
		$(PYTHON) tests/pgo/train.py $(PGO_DIR)/target/release/gateway $(PGO_DIR)/target/release/mock-vllm && \
		$(LLVM_PROFDATA) merge -o $(PGO_DIR)/merged.profdata.new $(PGO_DIR)/profiles && \
		mv $(PGO_DIR)/merged.profdata.new $(PGO_DIR)/merged.profdata || \
		{ echo "the profile-guided build's training failed (make build PGO=0 builds without it)"; exit 1; }; \
	fi
	RUSTFLAGS="$(RUSTFLAGS) -Cprofile-use=$(PGO_DIR)/merged.profdata" $(RELEASE_CARGO)
else
	@if [ "$(PGO)" = auto ]; then echo "no llvm-profdata of rustc's LLVM: building without profile guidance (apt-get install llvm-$$(bash tests/pgo/profdata.sh --major), or rustup component add llvm-tools)"; fi
	$(RELEASE_CARGO)
endif

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --locked

# nextest runs each test in its own process, which suits tests that own child processes;
# plain `cargo test` is the fallback where nextest is not installed.
test: lint test-venv
	@export GATEWAY_TEST_PYTHON=$(TEST_VENV)/bin/python; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast; \
	else \
		$(CARGO) test --locked --no-fail-fast; \
	fi
	$(MAKE) verify-unit
	$(MAKE) install-check

# Remade only when the pins change.
test-venv: $(TEST_VENV)/stamp
$(TEST_VENV)/stamp: tests/requirements.txt
	rm -rf $(TEST_VENV)
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --requirement tests/requirements.txt
	touch $@

vllm-setup:
	bash tests/vllm/setup.sh $(VLLM_DIR)

# tests/real_vllm.rs skips itself under a plain `cargo test`; GATEWAY_TEST_VLLM makes a missing
# setup a failure. One vLLM at a time: each takes about 3.5 GB and both cores while it loads.
test-vllm: vllm-setup
	@export GATEWAY_TEST_VLLM=$(VLLM_DIR); \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast --test-threads 1 --test real_vllm; \
	else \
		$(CARGO) test --locked --no-fail-fast --test real_vllm -- --test-threads=1; \
	fi

# systemd-analyze verify, against a copy of the unit whose ExecStart points at the freshly built
# binary (verify checks that it exists). Warnings do not change its exit code, so any output fails.
verify-unit:
	$(CARGO) build --locked --bin gateway
	@tmp=$$(mktemp -d) && \
	sed "s|/usr/local/bin/gateway|$(TARGET_DIR)/debug/gateway|g" systemd/gateway.service > $$tmp/gateway.service && \
	out=$$(systemd-analyze verify $$tmp/gateway.service 2>&1); rc=$$?; rm -rf $$tmp; \
	if [ $$rc -ne 0 ] || [ -n "$$out" ]; then echo "$$out"; echo "systemd-analyze verify failed"; exit 1; fi; \
	echo "systemd/gateway.service: verified"

fmt:
	$(CARGO) fmt --all

demo: build
	bash tests/demo.sh

bench:
	bash tests/bench/run.sh

# Instructions a forwarded request costs the gateway (and HAProxy: INSTR_TARGETS="gateway haproxy"),
# under callgrind: steadier than CPU time; see the script.
bench-instructions:
	bash tests/bench/instructions.sh

# The unit is installed with its paths rewritten for PREFIX and SYSCONFDIR; an existing
# config.toml is never overwritten.
install: build
	install -Dm755 $(TARGET_DIR)/release/gateway $(DESTDIR)$(PREFIX)/bin/gateway
	install -Dm755 $(TARGET_DIR)/release/mock-vllm $(DESTDIR)$(PREFIX)/bin/mock-vllm
	install -d $(DESTDIR)$(UNITDIR)
	sed -e "s|/usr/local/bin/gateway|$(PREFIX)/bin/gateway|g" \
	    -e "s|/etc/gateway/|$(SYSCONFDIR)/gateway/|g" \
	    systemd/gateway.service > $(DESTDIR)$(UNITDIR)/gateway.service
	chmod 644 $(DESTDIR)$(UNITDIR)/gateway.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/gateway/config.toml ]; then \
		echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/gateway/config.toml"; \
	else \
		install -Dm644 config.example.toml $(DESTDIR)$(SYSCONFDIR)/gateway/config.toml; \
	fi

# `make install` into a scratch DESTDIR with PREFIX=/usr: files in place, the unit pointing at
# them, and a second install keeping an edited config.
install-check:
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(MAKE) --no-print-directory install DESTDIR=$$tmp PREFIX=/usr >/dev/null && \
	test -x $$tmp/usr/bin/gateway && test -x $$tmp/usr/bin/mock-vllm && \
	grep -q '^ExecStart=/usr/bin/gateway serve --config /etc/gateway/config.toml$$' $$tmp/usr/lib/systemd/system/gateway.service && \
	cmp -s config.example.toml $$tmp/etc/gateway/config.toml && \
	echo '# edited' >> $$tmp/etc/gateway/config.toml && \
	$(MAKE) --no-print-directory install DESTDIR=$$tmp PREFIX=/usr >/dev/null && \
	tail -n1 $$tmp/etc/gateway/config.toml | grep -q '^# edited$$' && \
	echo "make install: verified"

clean:
	$(CARGO) clean
