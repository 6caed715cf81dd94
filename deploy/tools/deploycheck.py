#!/usr/bin/env python3
"""Generate and check diffit-server's deployment files (deploy/, Dockerfile).

    deploycheck.py generate        rewrite the generated files (PrometheusRule, Grafana dashboard)
    deploycheck.py check ...       what scripts/check-deploy.sh runs; see --help

Generated files (committed; `check` fails when they are stale):
  deploy/monitoring/prometheusrule.yaml  <- deploy/prometheus/alerts.yml (same groups, wrapped in the CR)
  deploy/grafana/diffit-dashboard.json   <- dashboard() below

`check` renders both overlays with kustomize (its Go library, loaded from the pykustomize wheel through ctypes:
see scripts/check-deploy.sh for why), validates every built-in object against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), and then checks what no schema knows: that the objects
refer to each other correctly, that the shutdown timings add up, that the HPA's metric is the one the adapter
serves, and that alerts and dashboard only use metrics the server exports. PromQL it cannot parse itself is
written to a rules file for `promtool check rules` (the caller runs promtool).
Needs PyYAML and kubernetes-validate (the check-deploy venv has both).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMRULE = DEPLOY / "monitoring" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "diffit-dashboard.json"
ADAPTER_CM = DEPLOY / "prometheus-adapter" / "configmap.yaml"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
OVERLAYS = ["cpu", "gpu"]
NAMESPACE = "diffit"
# Kubernetes versions whose schemas the rendered objects must satisfy (oldest supported, newest known).
K8S_VERSIONS = ["1.29.0", "1.37.0"]

# The metrics contract of the server (docs/deploy.md, "Metrics"); alerts, dashboard, adapter and HPA may only
# use these. kind: counter | gauge | histogram; labels: the labels the server puts on them.
# `model` is a served model's id (bounded: only ids the server was configured with); a generation request's
# request series carry it once the request named a served model. diffit_queue_depth is one series per model: the
# HPA's adapter rule sums them per pod (total queue depth).
METRICS = {
    "diffit_requests_total": ("counter", {"route", "status", "model"}),
    "diffit_request_duration_seconds": ("histogram", {"route", "model"}),
    "diffit_queue_depth": ("gauge", {"model"}),
    "diffit_queue_wait_seconds": ("histogram", {"model"}),
    "diffit_active_samples": ("gauge", {"model"}),
    "diffit_batch_size": ("histogram", {"engine", "device", "model"}),
    "diffit_step_duration_seconds": ("histogram", {"engine", "device", "model"}),
    "diffit_images_generated_total": ("counter", {"model"}),
    "diffit_decode_duration_seconds": ("histogram", {"model"}),
    "diffit_encode_duration_seconds": ("histogram", {"model"}),
    "diffit_rejections_total": ("counter", {"reason", "model"}),
    "diffit_ready": ("gauge", set()),
    "diffit_model_info": ("gauge", {"model", "dtype", "device", "image_size", "num_classes"}),
}
REJECTION_REASONS = {"queue_full", "deadline", "disconnected", "unauthorized", "invalid", "draining"}
# Labels Prometheus / the operator add to every scraped series.
TARGET_LABELS = {"namespace", "pod", "service", "job", "instance", "container", "endpoint", "le"}
# Settings the server reads from the environment; a ConfigMap key outside them is a typo. When the sources are
# there, the DIFFIT_* names are read from them (clap `env = "…"` attributes, and the kernel toggles such as
# DIFFIT_FUSED that the model reads with `std::env::var("…")`) instead of this list.
SETTINGS = {
    "DIFFIT_HOST", "DIFFIT_PORT", "DIFFIT_MODEL", "DIFFIT_VAE", "DIFFIT_VAE_CONFIG", "DIFFIT_DEVICE",
    "DIFFIT_DTYPE", "DIFFIT_MAX_BATCH", "DIFFIT_MAX_QUEUE", "DIFFIT_API_KEYS", "DIFFIT_LOG_FORMAT",
    "DIFFIT_REQUEST_TIMEOUT_SECS", "DIFFIT_MAX_REQUEST_TIMEOUT_SECS", "DIFFIT_DRAIN_TIMEOUT_SECS",
}
OTHER_ENV = {"RUST_LOG", "RAYON_NUM_THREADS"}  # read by tracing-subscriber and candle/rayon


def rust_sources() -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((ROOT / "src").rglob("*.rs")))


def server_settings() -> set[str]:
    src = rust_sources()
    found = set(re.findall(r'env\s*=\s*"(DIFFIT_[A-Z0-9_]+)"', src))
    if found:
        found |= set(re.findall(r'env::var(?:_os)?\(\s*"(DIFFIT_[A-Z0-9_]+)"', src))
    return (found or SETTINGS) | OTHER_ENV
HEALTH_ROUTES = "/healthz|/readyz|/metrics"


# --------------------------------------------------------------------------------------------------------------
# Generated files

def prometheusrule_text() -> str:
    alerts = yaml.safe_load(ALERTS.read_text())
    cr = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "diffit-server"},
        "spec": {"groups": alerts["groups"]},
    }
    head = (
        "# GENERATED from deploy/prometheus/alerts.yml by `python3 deploy/tools/deploycheck.py generate`.\n"
        "# Edit alerts.yml, then regenerate. If your Prometheus selects rules by label (kube-prometheus-stack:\n"
        "# `release: <helm release>`), add that label in the overlay.\n"
    )
    return head + yaml.dump(cr, Dumper=_BlockDumper, sort_keys=False, width=100, default_flow_style=False,
                            allow_unicode=True)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, the way a person writes them."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dashboard() -> dict:
    """The Grafana dashboard over the server's metrics (schemaVersion 39: Grafana 10.x / 11.x)."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    sel = 'namespace="$namespace", pod=~"$pod"'
    # Series with a `model` label follow the model selector; `=~".*"` (All) also matches series without it.
    msel = f'{sel}, model=~"$model"'
    api = f'{msel}, route!~"{HEALTH_ROUTES}"'
    rate = "$__rate_interval"
    panels: list[dict] = []
    next_id = iter(range(1, 1000))

    def target(expr: str, legend: str, ref: str, **extra) -> dict:
        t = {"datasource": ds, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}
        t.update(extra)
        return t

    def panel(kind: str, title: str, desc: str, x: int, y: int, w: int, h: int, targets: list[dict],
              unit: str = "short", **field) -> dict:
        defaults = {"unit": unit}
        defaults.update(field)
        p = {
            "id": next(next_id), "type": kind, "title": title, "description": desc, "datasource": ds,
            "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
        elif kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        panels.append(p)
        return p

    def row(title: str, y: int) -> None:
        panels.append({"id": next(next_id), "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})

    def quantiles(metric: str, filt: str, qs=(0.5, 0.95, 0.99)) -> list[dict]:
        return [target(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{filt}}}[{rate}])))",
                       f"p{round(q * 100)}", chr(ord("A") + i)) for i, q in enumerate(qs)]

    # Overview
    row("Overview", 0)
    panel("stat", "Ready replicas", "Pods whose /readyz is 200 (model loaded and warmed, not draining).",
          0, 1, 4, 4, [target(f"sum(diffit_ready{{{sel}}})", "ready", "A")], unit="none",
          thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                    {"color": "green", "value": 1}]})
    panel("stat", "API requests/s", "Requests per second on the API routes (health and metrics excluded).",
          4, 1, 4, 4, [target(f"sum(rate(diffit_requests_total{{{api}}}[{rate}]))", "req/s", "A")],
          unit="reqps")
    panel("stat", "Images/s", "Images generated per second, all pods.",
          8, 1, 4, 4, [target(f"sum(rate(diffit_images_generated_total{{{msel}}}[{rate}]))", "images/s", "A")])
    panel("stat", "5xx share", "Share of API requests answered with a 5xx status.",
          12, 1, 4, 4, [target(f'sum(rate(diffit_requests_total{{{api}, status=~"5.."}}[{rate}])) / '
                               f"sum(rate(diffit_requests_total{{{api}}}[{rate}]))", "5xx", "A")],
          unit="percentunit",
          thresholds={"mode": "absolute", "steps": [{"color": "green", "value": None},
                                                    {"color": "orange", "value": 0.01},
                                                    {"color": "red", "value": 0.05}]})
    panel("stat", "Queue depth", "Images waiting in the admission queues, all pods and the selected models "
          "(the HPA scales on every model's together).",
          16, 1, 4, 4, [target(f"sum(diffit_queue_depth{{{msel}}})", "images", "A")], unit="none")
    panel("stat", "Active samples", "Samples being denoised right now, all pods.",
          20, 1, 4, 4, [target(f"sum(diffit_active_samples{{{msel}}})", "samples", "A")], unit="none")

    row("Requests", 5)
    panel("timeseries", "Requests by status", "API requests per second by HTTP status.",
          0, 6, 12, 8, [target(f"sum by (status) (rate(diffit_requests_total{{{api}}}[{rate}]))",
                               "{{status}}", "A")], unit="reqps")
    panel("timeseries", "Request latency", "End-to-end API request latency (queue + denoise + decode + encode).",
          12, 6, 12, 8, quantiles("diffit_request_duration_seconds", api), unit="s")
    panel("timeseries", "Rejections by reason",
          "Requests refused or abandoned per second: queue_full (429), deadline (504), disconnected, "
          "unauthorized (401), invalid (400/422), draining (503).",
          0, 14, 12, 8, [target(f"sum by (reason) (rate(diffit_rejections_total{{{msel}}}[{rate}]))",
                                "{{reason}}", "A")], unit="reqps")
    panel("timeseries", "p99 latency by route", "p99 request latency per API route.",
          12, 14, 12, 8, [target("histogram_quantile(0.99, sum by (route, le) "
                                 f"(rate(diffit_request_duration_seconds_bucket{{{api}}}[{rate}])))",
                                 "{{route}}", "A")], unit="s")

    row("Queue and batching", 22)
    panel("timeseries", "Queue depth and active samples",
          "Images waiting in each pod's admission queues, and samples in its running batches.",
          0, 23, 12, 8, [target(f"sum by (pod) (diffit_queue_depth{{{msel}}})", "queued {{pod}}", "A"),
                         target(f"sum by (pod) (diffit_active_samples{{{msel}}})", "active {{pod}}", "B")],
          unit="none")
    panel("timeseries", "Queue wait", "Time from admission to the first denoising step.",
          12, 23, 12, 8, quantiles("diffit_queue_wait_seconds", msel), unit="s")
    panel("timeseries", "Batch size", "Samples per network forward (continuous batching).",
          0, 31, 12, 8, quantiles("diffit_batch_size", msel, (0.5, 0.95)) + [
              target(f"sum(rate(diffit_batch_size_sum{{{msel}}}[{rate}])) / "
                     f"sum(rate(diffit_batch_size_count{{{msel}}}[{rate}]))", "mean", "C")], unit="none")
    panel("timeseries", "Step latency", "Duration of one denoising step over the whole batch.",
          12, 31, 12, 8, quantiles("diffit_step_duration_seconds", msel), unit="s")

    row("Output", 39)
    panel("timeseries", "Images generated", "Images per second by pod.",
          0, 40, 12, 8, [target(f"sum by (pod) (rate(diffit_images_generated_total{{{msel}}}[{rate}]))",
                                "{{pod}}", "A")])
    panel("timeseries", "VAE decode and PNG encode latency",
          "Latency of the batched VAE decode and of PNG encoding.",
          12, 40, 12, 8, [
              target(f"histogram_quantile(0.5, sum by (le) (rate(diffit_decode_duration_seconds_bucket{{{sel}}}"
                     f"[{rate}])))", "decode p50", "A"),
              target(f"histogram_quantile(0.95, sum by (le) (rate(diffit_decode_duration_seconds_bucket{{{sel}}}"
                     f"[{rate}])))", "decode p95", "B"),
              target(f"histogram_quantile(0.5, sum by (le) (rate(diffit_encode_duration_seconds_bucket{{{sel}}}"
                     f"[{rate}])))", "encode p50", "C"),
              target(f"histogram_quantile(0.95, sum by (le) (rate(diffit_encode_duration_seconds_bucket{{{sel}}}"
                     f"[{rate}])))", "encode p95", "D")], unit="s")

    row("Models", 48)
    panel("timeseries", "Images/s by model", "Images generated per second for each served model.",
          0, 49, 8, 8, [target(f"sum by (model) (rate(diffit_images_generated_total{{{msel}}}[{rate}]))",
                               "{{model}}", "A")])
    panel("timeseries", "p99 latency by model",
          "p99 generation request latency per model: one model's backlog should not raise another's.",
          8, 49, 8, 8, [target("histogram_quantile(0.99, sum by (model, le) "
                               f"(rate(diffit_request_duration_seconds_bucket{{{api}, model!=\"\"}}[{rate}])))",
                               "{{model}}", "A")], unit="s")
    panel("timeseries", "Queue depth by model",
          "Images waiting per model; each model is guaranteed max_queue / (2 x models) of the queue.",
          16, 49, 8, 8, [target(f"sum by (model) (diffit_queue_depth{{{msel}}})", "{{model}}", "A"),
                         target(f'sum by (model) (rate(diffit_rejections_total{{{msel}, reason="queue_full"}}'
                                f"[{rate}]))", "429/s {{model}}", "B")], unit="none")

    row("Replicas", 57)
    panel("timeseries", "Ready by pod", "1 = ready, 0 = loading, warming up or draining.",
          0, 58, 12, 8, [target(f"max by (pod) (diffit_ready{{{sel}}})", "{{pod}}", "A")], unit="none",
          min=0, max=1, custom={"lineInterpolation": "stepAfter", "fillOpacity": 10})
    model = panel("table", "Models", "What each pod serves (diffit_model_info, one row per model).",
                  12, 58, 12, 8, [target(f"max by (pod, model, dtype, device, image_size, num_classes) "
                                         f"(diffit_model_info{{{msel}}})", "", "A",
                                         format="table", instant=True, range=False)], unit="none")
    model["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]

    def var(name: str, label: str, query: str, multi: bool) -> dict:
        v = {"name": name, "label": label, "type": "query", "datasource": ds, "definition": query,
             "query": {"query": query, "refId": f"{name}-var"}, "refresh": 2, "sort": 1,
             "includeAll": multi, "multi": multi, "current": {}, "options": [], "hide": 0, "regex": ""}
        if multi:
            v["allValue"] = ".*"
        return v

    return {
        "uid": "diffit-server",
        "title": "diffit-server",
        "description": "Latent DiffiT inference server: traffic, latency, queueing, batching, output.",
        "tags": ["diffit", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "options": [], "hide": 0, "refresh": 1, "regex": "", "includeAll": False,
             "multi": False},
            var("namespace", "Namespace", "label_values(diffit_ready, namespace)", False),
            var("pod", "Pod", 'label_values(diffit_ready{namespace="$namespace"}, pod)', True),
            var("model", "Model", 'label_values(diffit_model_info{namespace="$namespace"}, model)', True),
        ]},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


GENERATED = {PROMRULE: prometheusrule_text, DASHBOARD: dashboard_text}


def cmd_generate(_args) -> int:
    for path, fn in GENERATED.items():
        path.write_text(fn())
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Checks

class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.section = ""

    def start(self, section: str) -> None:
        self.section = section

    def ok(self, cond: bool, what: str) -> bool:
        if cond:
            self.passed += 1
        else:
            self.failed += 1
            print(f"  FAIL [{self.section}] {what}")
        return cond

    def note(self, what: str) -> None:
        print(f"  note [{self.section}] {what}")


class Kustomize:
    """kustomize's Go API (sigs.k8s.io/kustomize/api) from libpykustomize.so, called through ctypes."""

    def __init__(self, lib: str) -> None:
        self.lib = ctypes.CDLL(lib)
        self.lib.pykustomize_build.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self.lib.pykustomize_build.restype = ctypes.c_int
        self.lib.pykustomize_last_error.restype = ctypes.c_void_p
        self.lib.pykustomize_free.argtypes = [ctypes.c_void_p]
        self.lib.pykustomize_free.restype = None

    def build(self, path: Path) -> str:
        opts = {"load_restrictions": 0, "reorder": "legacy", "add_managedby_label": False,
                "enable_plugins": False, "enable_helm": False, "helm_command": ""}
        out = ctypes.c_void_p()
        rc = self.lib.pykustomize_build(str(path).encode(), json.dumps(opts).encode(), ctypes.byref(out))
        if rc != 0:
            err = self.lib.pykustomize_last_error()
            msg = ctypes.string_at(err).decode() if err else "unknown error"
            raise RuntimeError(f"kustomize build {path.relative_to(ROOT)}: {msg}")
        try:
            return ctypes.string_at(out).decode()
        finally:
            self.lib.pykustomize_free(out)


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def index(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def subset(small: dict, big: dict) -> bool:
    return all(big.get(k) == v for k, v in (small or {}).items())


def env_value(cm: dict, key: str):
    return (cm.get("data") or {}).get(key)


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bdiffit_[a-z_]+\b", expr))


def check_expr_metrics(rep: Report, expr: str, where: str) -> set[str]:
    """Every diffit_* name must be a contract metric (histograms only through _bucket/_sum/_count), every
    label matcher on it a label the server sets, every `reason` value a known reason."""
    used = set()
    for name in metric_names(expr):
        base, suffix = name, ""
        for s in ("_bucket", "_sum", "_count"):
            if name.endswith(s) and name[: -len(s)] in METRICS:
                base, suffix = name[: -len(s)], s
        rep.ok(base in METRICS, f"{where}: {name} is not a metric the server exports")
        if base in METRICS:
            kind, labels = METRICS[base]
            rep.ok((kind == "histogram") == bool(suffix),
                   f"{where}: {name}: a {kind} is used " + ("with" if suffix else "without") + " a histogram suffix")
            for sel in re.findall(re.escape(name) + r"\{([^}]*)\}", expr):
                for lab in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", sel):
                    rep.ok(lab in labels | TARGET_LABELS, f"{where}: {name} has no label {lab!r}")
            used.add(base)
    for reason in re.findall(r'reason\s*=\s*"([^"]*)"', expr):
        rep.ok(reason in REJECTION_REASONS, f"{where}: unknown rejection reason {reason!r}")
    return used


def check_generated(rep: Report) -> None:
    rep.start("generated")
    for path, fn in GENERATED.items():
        rep.ok(path.exists() and path.read_text() == fn(),
               f"{path.relative_to(ROOT)} is stale: run `python3 deploy/tools/deploycheck.py generate`")


def check_schemas(rep: Report, docs: list[dict], where: str) -> None:
    import kubernetes_validate as kv

    for d in docs:
        for v in ("apiVersion", "kind"):
            rep.ok(bool(d.get(v)), f"{where}: object without {v}: {str(d)[:80]}")
        rep.ok(bool((d.get("metadata") or {}).get("name")), f"{where}: {d.get('kind')} without metadata.name")
        if d.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            continue  # CRDs: no bundled schema; checked structurally below
        for ver in K8S_VERSIONS:
            try:
                kv.validate(d, ver, strict=True)
                rep.ok(True, "")
            except kv.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                rep.ok(False, f"{where}: {d['kind']}/{d['metadata']['name']} invalid for k8s {ver} at {path}: "
                              f"{e.message}")
            except kv.SchemaNotFoundError as e:
                rep.ok(False, f"{where}: no k8s {ver} schema for {d['apiVersion']} {d['kind']}: {e}")


def check_overlay(rep: Report, name: str, docs: list[dict], adapter_metric: str, alerts: dict) -> None:
    rep.start(f"overlay {name}")
    objs = index(docs)
    kinds = {k for k, _ in objs}
    for k in ("Namespace", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
              "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"):
        rep.ok(k in kinds, f"no {k} rendered")
    for d in docs:
        if d["kind"] != "Namespace":
            rep.ok(d["metadata"].get("namespace") == NAMESPACE,
                   f"{d['kind']}/{d['metadata']['name']} not in namespace {NAMESPACE}")
    deps = [d for d in docs if d["kind"] == "Deployment"]
    if not rep.ok(len(deps) == 1, "expected exactly one Deployment"):
        return
    dep = deps[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    rep.ok("replicas" not in spec, "Deployment sets spec.replicas: the HPA owns the replica count")
    rep.ok(subset(spec["selector"]["matchLabels"], pod_labels), "Deployment selector does not match its pods")
    ctrs = pod["containers"]
    rep.ok(len(ctrs) == 1, "expected one container")
    c = ctrs[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    rep.ok("http" in ports, "container has no port named http")
    rep.ok(c["image"].split(":")[0] != "diffit-server" and ":" in c["image"],
           f"image {c['image']!r}: the overlay must set a registry name and tag (kustomize `images:`)")

    # settings
    cms = {n: d for (k, n), d in objs.items() if k == "ConfigMap"}
    refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    rep.ok(len(refs) == 1 and refs[0] in cms, f"envFrom configMapRef {refs} does not name a rendered ConfigMap")
    cm = cms.get(refs[0]) if refs else None
    if cm:
        data = cm.get("data") or {}
        settings = server_settings()
        for key in data:
            rep.ok(key in settings, f"ConfigMap key {key} is not a setting the server reads")
        rep.ok("DIFFIT_API_KEYS" not in data, "API keys belong in the Secret, not the ConfigMap")
        rep.ok(re.fullmatch(r"auto|cpu|cuda(:\d+)?", data.get("DIFFIT_DEVICE", "auto")) is not None,
               f"DIFFIT_DEVICE={data.get('DIFFIT_DEVICE')}")
        rep.ok(data.get("DIFFIT_DTYPE", "f32") in {"f32", "bf16", "f16"}, f"DIFFIT_DTYPE={data.get('DIFFIT_DTYPE')}")
        rep.ok(data.get("DIFFIT_LOG_FORMAT", "text") in {"text", "json"},
               f"DIFFIT_LOG_FORMAT={data.get('DIFFIT_LOG_FORMAT')}")
        ints = {}
        for key in ("DIFFIT_PORT", "DIFFIT_MAX_BATCH", "DIFFIT_MAX_QUEUE", "DIFFIT_REQUEST_TIMEOUT_SECS",
                    "DIFFIT_MAX_REQUEST_TIMEOUT_SECS", "DIFFIT_DRAIN_TIMEOUT_SECS"):
            v = data.get(key)
            if rep.ok(v is not None and v.isdigit() and int(v) > 0, f"{key}={v!r}: set a positive integer"):
                ints[key] = int(v)
        if len(ints) == 6:
            rep.ok(ints["DIFFIT_PORT"] == ports.get("http"), "DIFFIT_PORT differs from the container's http port")
            rep.ok(ints["DIFFIT_REQUEST_TIMEOUT_SECS"] <= ints["DIFFIT_MAX_REQUEST_TIMEOUT_SECS"],
                   "default request timeout above the maximum")
            rep.ok(ints["DIFFIT_MAX_REQUEST_TIMEOUT_SECS"] <= ints["DIFFIT_DRAIN_TIMEOUT_SECS"],
                   "drain timeout shorter than the longest allowed request: SIGTERM would cut requests off")
            rep.ok(ints["DIFFIT_MAX_BATCH"] <= ints["DIFFIT_MAX_QUEUE"], "max queue smaller than one batch")
            pre = ((c.get("lifecycle") or {}).get("preStop") or {})
            cmd = (pre.get("exec") or {}).get("command") or []
            sleep = int(cmd[-1]) if cmd[:1] == ["sleep"] and cmd[-1].isdigit() else \
                int((pre.get("sleep") or {}).get("seconds", -1))
            rep.ok(sleep > 0, "container has no preStop sleep")
            grace = pod.get("terminationGracePeriodSeconds", 30)
            rep.ok(grace >= sleep + ints["DIFFIT_DRAIN_TIMEOUT_SECS"],
                   f"terminationGracePeriodSeconds {grace} < preStop {sleep} + drain "
                   f"{ints['DIFFIT_DRAIN_TIMEOUT_SECS']}: the kubelet would SIGKILL a draining pod")
            hpa_avg = None
            for h in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
                for m in h["spec"].get("metrics", []):
                    if m["type"] == "Pods":
                        hpa_avg = float(m["pods"]["target"].get("averageValue", "0"))
            if hpa_avg is not None:
                rep.ok(0 < hpa_avg <= ints["DIFFIT_MAX_QUEUE"],
                       f"HPA target queue depth {hpa_avg} outside (0, DIFFIT_MAX_QUEUE]: it could never trigger")
    env = {e["name"]: e for e in c.get("env", [])}
    key_ref = ((env.get("DIFFIT_API_KEYS") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    rep.ok(bool(key_ref.get("name")) and key_ref.get("optional") is True,
           "DIFFIT_API_KEYS must come from a Secret reference with optional: true")

    # probes
    def probe(kind: str):
        return ((c.get(kind) or {}).get("httpGet") or {})
    rep.ok(probe("livenessProbe").get("path") == "/healthz", "livenessProbe is not GET /healthz")
    rep.ok(probe("readinessProbe").get("path") == "/readyz", "readinessProbe is not GET /readyz")
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        p = probe(kind).get("port")
        rep.ok(p in ports or p in ports.values(), f"{kind} port {p!r} is not a container port")
    rep.ok(probe("startupProbe").get("path") == "/healthz", "startupProbe is not GET /healthz")

    # security
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    rep.ok(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, "pod may run as root")
    rep.ok(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation not false")
    rep.ok("ALL" in ((csc.get("capabilities") or {}).get("drop") or []), "capabilities not dropped")

    # GPU
    res = c.get("resources") or {}
    gpus = (res.get("limits") or {}).get("nvidia.com/gpu")
    if name == "gpu":
        rep.ok(str(gpus) == "1", f"GPU overlay: limits nvidia.com/gpu is {gpus!r}, want 1")
        rep.ok(str(env_value(cm or {}, "DIFFIT_DEVICE")).startswith("cuda"), "GPU overlay: DIFFIT_DEVICE not cuda")
    else:
        rep.ok(gpus is None, "CPU overlay requests a GPU")
        rep.ok(env_value(cm or {}, "DIFFIT_DEVICE") in ("cpu", "auto"), "CPU overlay: DIFFIT_DEVICE not cpu/auto")

    # Service, PDB, HPA, ServiceMonitor, PrometheusRule
    svcs = [d for d in docs if d["kind"] == "Service"]
    for s in svcs:
        rep.ok(subset(s["spec"]["selector"], pod_labels), f"Service {s['metadata']['name']} selects no pod")
        for p in s["spec"]["ports"]:
            rep.ok(p["targetPort"] in ports or p["targetPort"] in ports.values(),
                   f"Service port {p.get('name')} targets {p['targetPort']!r}, not a container port")
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        rep.ok(subset(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PodDisruptionBudget selects no pod")
    for h in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        ref = h["spec"]["scaleTargetRef"]
        rep.ok(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"],
               f"HPA targets {ref['kind']}/{ref['name']}")
        pods_metrics = [m["pods"]["metric"]["name"] for m in h["spec"].get("metrics", []) if m["type"] == "Pods"]
        rep.ok(pods_metrics == [adapter_metric],
               f"HPA Pods metrics {pods_metrics} != [{adapter_metric!r}] served by prometheus-adapter")
        rep.ok(h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"], "HPA minReplicas > maxReplicas")
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        matched = [s for s in svcs if subset(sm["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        rep.ok(len(matched) == 1, f"ServiceMonitor selects {len(matched)} Services")
        for ep in sm["spec"]["endpoints"]:
            rep.ok(any(ep.get("port") == p.get("name") for s in matched for p in s["spec"]["ports"]),
                   f"ServiceMonitor endpoint port {ep.get('port')!r} is not a named Service port")
            rep.ok(ep.get("path") == "/metrics", "ServiceMonitor does not scrape /metrics")
    for pr in (d for d in docs if d["kind"] == "PrometheusRule"):
        rep.ok(pr["spec"] == {"groups": alerts["groups"]}, "PrometheusRule groups differ from prometheus/alerts.yml")
    dash = [d for d in docs if d["kind"] == "ConfigMap" and "diffit-dashboard.json" in (d.get("data") or {})]
    rep.ok(len(dash) == 1 and _json(dash[0]["data"]["diffit-dashboard.json"]) == dashboard(),
           "the Grafana dashboard ConfigMap does not carry deploy/grafana/diffit-dashboard.json")


def adapter_rules(rep: Report) -> tuple[str, list[str]]:
    """Check the prometheus-adapter rule; return the metric name it serves and PromQL for promtool."""
    rep.start("prometheus-adapter")
    cm = yaml.safe_load(ADAPTER_CM.read_text())
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    rep.ok(values["rules"]["custom"] == cfg["rules"], "values.yaml rules.custom differ from configmap.yaml rules")
    rules = [r for r in cfg["rules"] if "diffit_queue_depth" in r["seriesQuery"]]
    if not rep.ok(len(rules) == 1, "no adapter rule for diffit_queue_depth"):
        return "", []
    r = rules[0]
    ov = r["resources"]["overrides"]
    rep.ok(ov.get("namespace", {}).get("resource") == "namespace" and ov.get("pod", {}).get("resource") == "pod",
           "rule must map the namespace and pod labels onto resources (the HPA asks per pod)")
    series = "diffit_queue_depth"
    m = re.search(r["name"]["matches"], series)
    rep.ok(m is not None, f"name.matches {r['name']['matches']!r} does not match {series}")
    # `as` is a Go regexp template ($1 / ${1}); without it the series name is served unchanged.
    as_ = r["name"].get("as")
    served = series if not as_ else (m.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", as_)) if m else "")
    mq = r["metricsQuery"]
    for part in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        rep.ok(part in mq, f"metricsQuery lacks {part}")
    concrete = (mq.replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", 'namespace="diffit",pod=~"diffit-server-a|diffit-server-b"')
                .replace("<<.GroupBy>>", "pod"))
    check_expr_metrics(rep, r["seriesQuery"], "adapter seriesQuery")
    check_expr_metrics(rep, concrete, "adapter metricsQuery")
    return served, [r["seriesQuery"], concrete]


def check_server_metrics(rep: Report) -> None:
    """The metrics contract against the server's sources: every metric the deploy files use must be emitted."""
    rep.start("server metrics")
    src = rust_sources()
    if not src:
        rep.note("no src/*.rs: metrics contract not compared with the server")
        return
    emitted = set(re.findall(r'"(diffit_[a-z_]+)"', src))
    for name in METRICS:
        rep.ok(name in emitted, f"{name} is used by deploy/ but the server's sources never name it")
    for name in sorted(emitted - set(METRICS)):
        rep.note(f"the server emits {name}, which deploy/ does not use yet")


def check_alerts(rep: Report, alerts: dict) -> None:
    rep.start("alerts")
    names = set()
    for g in alerts["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                rep.ok(r["alert"] not in names, f"duplicate alert {r['alert']}")
                names.add(r["alert"])
                rep.ok(r.get("labels", {}).get("severity") in {"critical", "warning", "info"},
                       f"{r['alert']}: severity label missing")
                rep.ok({"summary", "description"} <= set(r.get("annotations", {})),
                       f"{r['alert']}: summary/description annotations missing")
            check_expr_metrics(rep, r["expr"], f"alert {r.get('alert', r.get('record'))}")
    tests = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
              if any(t.get("exp_alerts") or [])}
    rep.ok(names <= tested, f"alerts without a firing unit test: {sorted(names - tested)}")


def check_dashboard(rep: Report) -> list[str]:
    rep.start("grafana")
    try:
        d = json.loads(DASHBOARD.read_text())
    except ValueError as e:
        rep.ok(False, f"diffit-dashboard.json does not parse: {e}")
        return []
    rep.ok(bool(d.get("uid")) and bool(d.get("title")), "dashboard needs uid and title")
    variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
    panels = d.get("panels", [])
    ids = [p.get("id") for p in panels]
    rep.ok(len(ids) == len(set(ids)) and None not in ids, "panel ids missing or duplicated")
    cells: dict[tuple[int, int], str] = {}
    exprs, used = [], set()
    for p in panels:
        g = p.get("gridPos") or {}
        if not rep.ok(all(k in g for k in "xywh") and g["x"] + g["w"] <= 24, f"panel {p.get('title')}: gridPos"):
            continue
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        clash = {cells[xy] for xy in mine if xy in cells}
        rep.ok(not clash, f"panel {p.get('title')!r} overlaps {sorted(clash)}")
        cells.update({xy: p.get("title", "") for xy in mine})
        if p.get("type") == "row":
            continue
        targets = p.get("targets") or []
        rep.ok(bool(targets), f"panel {p.get('title')} has no query")
        refs = [t.get("refId") for t in targets]
        rep.ok(len(refs) == len(set(refs)), f"panel {p.get('title')}: duplicate refIds")
        for t in targets:
            expr = t.get("expr", "")
            for v in re.findall(r"\$(?!__)\{?([a-zA-Z_]+)", expr):
                rep.ok(v in variables, f"panel {p['title']}: unknown variable ${v}")
            rep.ok((t.get("datasource") or {}).get("uid") == "${datasource}",
                   f"panel {p['title']}: query not bound to the $datasource variable")
            used |= check_expr_metrics(rep, expr, f"panel {p['title']}")
            exprs.append(re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
                         .replace("$namespace", "diffit").replace("$pod", ".*"))
    rep.ok(used == set(METRICS), f"metrics missing from the dashboard: {sorted(set(METRICS) - used)}")
    return exprs


def check_dockerfile(rep: Report) -> None:
    rep.start("Dockerfile")
    text = (ROOT / "Dockerfile").read_text()
    stages: dict[str, list[str]] = {}
    cur = None
    for line in re.sub(r"\\\n", " ", text).splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line.strip(), re.I)
        if m:
            cur = m.group(2) or m.group(1)
            stages[cur] = [line.strip()]
        elif cur and line.strip() and not line.strip().startswith("#"):
            stages[cur].append(line.strip())
    for target in ("cpu", "gpu"):
        if not rep.ok(target in stages, f"no `{target}` stage"):
            continue
        st = stages[target]
        base = st[0].split()[1]
        rep.ok(":" in base and not base.endswith(":latest"), f"{target}: base image {base} not pinned by tag")
        rep.ok(any(s.startswith("USER ") and s.split()[1].split(":")[0] not in ("0", "root") for s in st),
               f"{target}: no non-root USER")
        rep.ok(any(s.startswith("HEALTHCHECK ") and "/healthz" in s for s in st), f"{target}: no HEALTHCHECK on /healthz")
        rep.ok('ENTRYPOINT ["diffit-server", "serve"]' in st, f"{target}: ENTRYPOINT is not diffit-server serve")
        rep.ok(any(s.startswith("COPY") and "weights" in s for s in st), f"{target}: weights not copied in")
    rep.ok(list(stages)[-1] == "gpu", "the GPU image should be the last (default) stage")
    rep.ok("cargo build --release --locked --features cuda" in text, "GPU build is not --features cuda")
    rep.ok(re.search(r"FROM nvidia/cuda:13\.0\.\d+-runtime-", text) is not None, "GPU runtime is not CUDA 13.0")
    weights = list((ROOT / "weights").glob("*.safetensors"))
    if not weights:
        rep.note("weights/ holds no *.safetensors yet: `COPY weights/` would copy no model")


def run_kubectl_crosscheck(rep: Report, rendered: dict[str, list[dict]]) -> None:
    """When a kubectl with kustomize v5 is on PATH, its render must agree with the library's."""
    rep.start("kubectl kustomize")
    kubectl = shutil.which("kubectl")
    if not kubectl:
        rep.note("no kubectl on PATH: cross-check skipped")
        return
    try:
        ver = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True,
                                        text=True, timeout=30).stdout or "{}")
    except (ValueError, subprocess.SubprocessError):
        ver = {}
    kv = ver.get("kustomizeVersion", "")
    if not kv.startswith("v5"):
        rep.note(f"kubectl's kustomize is {kv or 'unknown'}, not v5: cross-check skipped")
        return
    for name, docs in rendered.items():
        r = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / name)], capture_output=True, text=True)
        if rep.ok(r.returncode == 0, f"kubectl kustomize overlays/{name}: {r.stderr.strip()}"):
            key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
            same = sorted(docs_of(r.stdout), key=key) == sorted(docs, key=key)
            if rep.ok(same, f"kubectl kustomize ({kv}) and the kustomize library render overlays/{name} differently"):
                print(f"overlays/{name}: kubectl kustomize {kv} renders the same objects")


def cmd_check(args) -> int:
    rep = Report()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alerts = yaml.safe_load(ALERTS.read_text())

    check_generated(rep)
    check_server_metrics(rep)
    check_dockerfile(rep)
    check_alerts(rep, alerts)
    served, adapter_exprs = adapter_rules(rep)
    dash_exprs = check_dashboard(rep)

    kz = Kustomize(args.kustomize_lib)
    rendered: dict[str, list[dict]] = {}
    for name in OVERLAYS:
        rep.start(f"render {name}")
        try:
            text = kz.build(DEPLOY / "overlays" / name)
        except RuntimeError as e:
            rep.ok(False, str(e))
            continue
        (out / f"overlay-{name}.yaml").write_text(text)
        docs = docs_of(text)
        rendered[name] = docs
        print(f"overlays/{name}: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
        check_schemas(rep, docs, f"overlays/{name}")
        check_overlay(rep, name, docs, served, alerts)
    rep.start("render prometheus-adapter")
    try:
        docs = docs_of(kz.build(DEPLOY / "prometheus-adapter"))
        check_schemas(rep, docs, "prometheus-adapter")
    except RuntimeError as e:
        rep.ok(False, str(e))
    if args.kubectl_crosscheck:
        run_kubectl_crosscheck(rep, rendered)

    # PromQL that only promtool can parse: dashboard queries and the adapter's queries as recording rules.
    rules = [{"record": f"check:dashboard_{i}", "expr": e} for i, e in enumerate(dash_exprs)]
    rules += [{"record": f"check:adapter_{i}", "expr": e} for i, e in enumerate(adapter_exprs)]
    (out / "promql-rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "promql", "rules": rules}]}))
    print(f"deploycheck: {rep.passed} checks passed, {rep.failed} failed")
    return 1 if rep.failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("generate", help="rewrite the generated files").set_defaults(fn=cmd_generate)
    c = sub.add_parser("check", help="render and validate everything")
    c.add_argument("--kustomize-lib", required=True, help="path to libpykustomize.so")
    c.add_argument("--out", required=True, help="folder for rendered overlays and the PromQL rules file")
    c.add_argument("--kubectl-crosscheck", action="store_true",
                   help="also render with `kubectl kustomize` when it is kustomize v5, and compare")
    c.set_defaults(fn=cmd_check)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
