# layerlb's entry points. `make demo` runs the main job, `make test` everything CI checks.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# helm comes from the local cluster's Go-module build, in the same cache the e2e fixtures use.
HELM := $(or $(LAYERLB_CACHE),$(CURDIR)/.cache)/k8s/bin/helm

.PHONY: setup system-packages lint typecheck unit test chaos demo bench bench-operator bench-services bench-ipvs bench-ecmp bench-bgp bench-announce bench-announce-kube bench-announce-soak kind-e2e crds chart goldens cluster cluster-down clean

setup: system-packages $(VENV)/.installed

system-packages:
	@bash scripts/system-packages.sh

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "[setup] installing layerlb and its dev tools into $(VENV)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q

test: lint typecheck unit

# The chaos and abuse suite (#18), each case under real traffic counting every failed request: faults of the
# data plane and its backends, resource abuse, the parsers' short fuzzing (tests/chaos, tests/fuzz), the
# control plane killed and cut off (e2e/operator_faults, API server only), and faults on real nodes (e2e/nodes'
# chaos and Ready-under-load tests, root). All of it is also part of `make test`; the long runs are
# `make bench-fuzz`, `bench-mutation` and `bench-abuse`.
chaos: setup
	$(BIN)/pytest -q tests/chaos tests/fuzz e2e/operator_faults $(wildcard e2e/nodes/test_chaos_*.py) e2e/nodes/test_ready_serving.py

# Regenerate what is generated from the models and templates (then review the diff).
crds: setup
	$(BIN)/layerlb crd --write crds
	$(PY) charts/sync.py

# The Helm chart: copy in the CRDs and the operator's RBAC rules, then lint it.
chart: setup $(HELM)
	$(PY) charts/sync.py
	$(HELM) lint --strict charts/layerlb

$(HELM):
	@bash e2e/cluster/build.sh

goldens: setup $(HELM)
	$(BIN)/pytest -q tests/test_render.py tests/test_chart.py --update-goldens

demo: setup
	@bash examples/demo.sh

# layerlb against HAProxy, nginx direct and the kernel path in one run (~5 min): a table and bench/results/*.json.
bench: setup
	@bash bench/packages.sh
	$(PY) bench/run.py $(BENCH_ARGS)

# The operator's targets on the local cluster (root; ~5 min): apply → Ready and endpoint change → served
# on two real nodes with the chart's operator, then the 1,000-LoadBalancer cold start. Tables on stdout.
bench-operator: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) -m bench.operator_targets $(TARGETS_ARGS)
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) bench/operator_scale.py $(SCALE_ARGS)

# The Service controller's target on the local API server (no nodes, no root; ~1 min): Service created →
# status.loadBalancer.ingress written, p50/p95/max over 50 Services one after another and in a burst.
bench-services: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) -m bench.service_status $(SERVICE_STATUS_ARGS)

# The IPVS engine's sync figures (1,000 services x 10 real servers: first sync, no-op re-syncs), measured in
# the QEMU/TCG guest (this kernel has no IPVS) with a native estimate by the emulation factor (~1 min).
bench-ipvs: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) -m pytest -q -s -p no:cacheprovider tests/kernel/test_ipvs_guest.py -k bench

# Connections reset when a node joins or leaves an ECMP route (root; ~5 min): 100 long-lived flows through a
# multipath router, nftables dsr/nat here (a static route, then FRR learning it over BGP from the speakers),
# IPVS dsr/tunnel/nat in the QEMU guest; a table on stdout.
bench-ecmp: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) -m bench.ecmp $(ECMP_ARGS)

# 1,000 VIPs over BGP (root; ~1 min): from the speaker's start until the FRR router's FIB holds all of them,
# and the speaker's and its BIRD's RSS; p50/max over RUNS fresh labs (BGP_ARGS: --vips N, --speakers 3).
bench-bgp: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane:$(CURDIR)/speaker" $(PY) -m bench.bgp --runs $(RUNS) $(BGP_ARGS)

# The speaker's figures on a network-namespace LAN (root; ~3 min): 1,000 VIPs answered after start and the
# speaker's RSS, then 20 failovers each for a killed speaker and a cut link (p50/p95, pings lost).
bench-announce: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane:$(CURDIR)/speaker" $(PY) -m bench.announce $(ANNOUNCE_ARGS)

# The speaker's "1,000 VIPs announced by one speaker within 10 s of its start, RSS <= 100 MB" in Kubernetes mode (root;
# ~3 min): the local control plane, 1,000 Services of layerlb's class, one speaker in a netns; p50/max over RUNS.
RUNS ?= 3
bench-announce-kube: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane:$(CURDIR)/speaker" $(PY) -m bench.announce_kube --runs $(RUNS) $(ANNOUNCE_KUBE_ARGS)

# The speaker's "no false takeover in 10 minutes of a healthy, loaded cluster" (root; SOAK seconds, default 600):
# three speakers and 50 VIPs, busy workers and UDP requests to every VIP; counts moves and lost requests.
SOAK ?= 600
bench-announce-soak: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane:$(CURDIR)/speaker" $(PY) -m bench.announce --soak $(SOAK) $(ANNOUNCE_ARGS)

# Where Docker exists (a laptop, GitHub Actions): image, kind cluster, Helm chart, e2e suite. Unverified here.
kind-e2e:
	@bash e2e/kind/run.sh

cluster: setup
	@$(PY) e2e/cluster/cluster.py up

cluster-down:
	@$(PY) e2e/cluster/cluster.py down

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache

# Mutation testing (cosmic-ray; ~2 h for every module on a quiet machine, resumable): the sans-IO cores, the
# balancing/health/routing modules and resolve/validation, each against its own layer's tests; the kill rate
# per module and every survivor's diff. MUTATION_ARGS: --modules targets state, --budget SECONDS, --recheck.
.PHONY: bench-mutation
bench-mutation: setup
	$(PY) -m bench.mutation $(MUTATION_ARGS)

# The parsers under atheris, coverage-guided (#18): each fuzz target for 10 million executions from its committed
# corpus (hours; FUZZ_ARGS: --seconds S per target, --targets http_request,differential, --rounds R); a table of
# executions, execs/s and findings, the inputs of any finding under bench/results/.
.PHONY: bench-fuzz
bench-fuzz: setup
	$(PY) -m bench.fuzz $(FUZZ_ARGS)

# Resource abuse against `layerlb serve`, longer and harder than tests/chaos/test_abuse_*.py (#18): per abuse
# (idle, flood, slowloris heads and bodies, huge headers and bodies, clients that never read, one address over
# its cap, descriptors exhausted) the legitimate client's p50/p99 quiet and abused, and the serve process's
# RSS, descriptors and CPU meanwhile (~10 min). ABUSE_ARGS: --seconds S per window, --only NAME,..., --json PATH.
.PHONY: bench-abuse
bench-abuse: setup
	$(PY) -m bench.abuse $(ABUSE_ARGS)

# 10,000 Plan updates under load (#18; ~6 min): tests/chaos/test_plan_churn.py's scenario, longer. Endpoints, a
# route and the HTTPS certificate change on every update while wrk counts failed requests; the data plane's RSS
# every 1,000 updates. CHURN_ARGS: --updates N, --every N, --max-growth MiB.
.PHONY: bench-chaos-churn
bench-chaos-churn: setup
	PYTHONPATH="$(CURDIR):$(CURDIR)/operator:$(CURDIR)/dataplane" $(PY) -m bench.plan_churn $(CHURN_ARGS)
