"""Coral Edge TPU backend: full-integer .tflite, ``edgetpu_compiler``, LiteRT with the ``libedgetpu.so.1`` delegate.

The compiler maps operators to the TPU up to the first one it cannot run; everything after runs on the host CPU.
Each compiled variant therefore carries an :class:`EdgeTPUCompileReport` (ops mapped / falling back, with the
compiler's reason), parsed from the compiler's operation table, and the backend's ``environment()`` reports the one
for the variant prepared last.  The first invoke copies the parameters into TPU memory (tens of ms) and is excluded.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from latency_service.backends.base import Backend, BackendStatus, BackendUnavailable, Runnable
from latency_service.backends.litert import TFLiteRunnable, check_tflite_payload, litert_version
from latency_service.backends.tflite_builder import build_identity_tflite, build_op_tflite, interpreter_class
from predictors.ops import OpSpec

EDGETPU_LIBRARY = "libedgetpu.so.1"
COMPILER = "edgetpu_compiler"
PCIE_DEVICE = Path("/dev/apex_0")
# USB accelerator ids: before its firmware is loaded it enumerates as Global Unichip, afterwards as Google.
USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}
_COMPILED_MARKER = b"edgetpu-custom-op"
_MAPPED = "Mapped to Edge TPU"
_OPERATION_ROW = re.compile(r"^(?P<op>[A-Z][A-Z0-9_]*)\s+(?P<count>\d+)\s+(?P<status>\S.*?)\s*$")
_HEADER = re.compile(r"^Operator\s+Count\s+Status\s*$")


@dataclass(frozen=True)
class CpuFallback:
    op: str
    count: int
    reason: str


@dataclass(frozen=True)
class EdgeTPUCompileReport:
    """What ``edgetpu_compiler`` did with one model, from its stdout or its ``*_edgetpu.log``."""

    compiler_version: str | None
    ops_total: int
    ops_mapped: int
    mapped: dict[str, int] = field(default_factory=dict)
    cpu_fallback: list[CpuFallback] = field(default_factory=list)
    tpu_subgraphs: int | None = None

    @property
    def fully_mapped(self) -> bool:
        return not self.cpu_fallback

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_compiler_log(text: str) -> EdgeTPUCompileReport:
    """Parse the operation table the compiler prints with ``-s`` and writes to ``<model>_edgetpu.log``.

    Raises:
        ValueError: when ``text`` holds no operation table (the compiler failed before mapping).
    """
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    subgraphs = re.search(r"Number of Edge TPU subgraphs:\s*(\d+)", text)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _HEADER.match(line.strip())), None)
    if start is None:
        raise ValueError("compiler log: no 'Operator Count Status' table (did the compilation fail?)")
    mapped: dict[str, int] = {}
    fallback: list[CpuFallback] = []
    for line in lines[start + 1 :]:
        row = _OPERATION_ROW.match(line.strip())
        if row is None:
            if line.strip() and (mapped or fallback):
                break  # the table ends at the first line that is not a row ("Compilation succeeded!")
            continue
        op, count, status = row["op"], int(row["count"]), row["status"]
        if status.startswith(_MAPPED):
            mapped[op] = mapped.get(op, 0) + count
        else:
            fallback.append(CpuFallback(op, count, status))
    total = sum(mapped.values()) + sum(f.count for f in fallback)
    return EdgeTPUCompileReport(
        compiler_version=version.group(1) if version else None,
        ops_total=total,
        ops_mapped=sum(mapped.values()),
        mapped=mapped,
        cpu_fallback=fallback,
        tpu_subgraphs=int(subgraphs.group(1)) if subgraphs else None,
    )


def compile_for_edgetpu(model: bytes, *, timeout_s: int = 180) -> tuple[bytes, EdgeTPUCompileReport]:
    """Run ``edgetpu_compiler`` on an int8 .tflite; returns the compiled model and the parsed operation table."""
    compiler = shutil.which(COMPILER)
    if compiler is None:
        raise BackendUnavailable(f"{COMPILER} is not on PATH (Debian package edgetpu-compiler, x86-64 only)")
    with tempfile.TemporaryDirectory(prefix="figs-edgetpu-") as tmp:
        source = Path(tmp) / "variant.tflite"
        source.write_bytes(model)
        command = [compiler, "--show_operations", "--timeout_sec", str(timeout_s), "--out_dir", tmp, str(source)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 30, check=False)
        compiled = Path(tmp) / "variant_edgetpu.tflite"
        if result.returncode != 0 or not compiled.exists():
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{COMPILER} failed (exit {result.returncode}): {' | '.join(detail)}")
        log_file = Path(tmp) / "variant_edgetpu.log"
        log = log_file.read_text() if log_file.exists() else ""
        # The .log holds the table but not the version banner on some releases; stdout holds both.
        report = parse_compiler_log(result.stdout if _HEADER.search(result.stdout or "") else log)
        return compiled.read_bytes(), report


def usb_accelerator_present(sysfs: Path = Path("/sys/bus/usb/devices")) -> bool:
    for device in sysfs.glob("*"):
        try:
            ids = ((device / "idVendor").read_text().strip(), (device / "idProduct").read_text().strip())
        except OSError:
            continue
        if ids in USB_IDS:
            return True
    return False


def _library_loadable() -> str | None:
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError as exc:
        return f"{EDGETPU_LIBRARY} cannot be loaded ({exc}); install libedgetpu1-std from Coral's apt repository"
    return None


class EdgeTPUBackend(Backend):
    """A Coral Edge TPU (PCIe ``/dev/apex_0`` or USB) through LiteRT's external delegate."""

    name = "edgetpu"

    def __init__(self, *, device: str | None = None, compiler_timeout_s: int = 180) -> None:
        status = self.status()
        if not status.available:
            raise BackendUnavailable(f"edgetpu: {status.reason}")
        self.device = device  # "usb", "usb:0", "pci:0" or None for the first one found
        self.compiler_timeout_s = compiler_timeout_s
        self.last_compile: EdgeTPUCompileReport | None = None

    @classmethod
    def status(cls) -> BackendStatus:
        missing = []
        try:
            interpreter_class()
        except ImportError:
            missing.append("the LiteRT interpreter (ai-edge-litert or tflite-runtime)")
        library_problem = _library_loadable()
        if library_problem:
            missing.append(library_problem)
        if shutil.which(COMPILER) is None:
            missing.append(f"{COMPILER} on PATH")
        if not PCIE_DEVICE.exists() and not usb_accelerator_present():
            missing.append(f"an Edge TPU device ({PCIE_DEVICE} or a USB accelerator 1a6e:089a / 18d1:9302)")
        if missing:
            return BackendStatus(name=cls.name, available=False, reason="missing: " + "; ".join(missing))
        return BackendStatus(name=cls.name, available=True)

    def environment(self) -> dict[str, Any]:
        return {
            "runtime": "edgetpu",
            "runtime_version": litert_version() or "unknown",
            "delegate": EDGETPU_LIBRARY,
            "device": self.device or "auto",
            "model_format": "tflite full-integer int8, edgetpu_compiler",
            "first_invoke_excluded": True,
            "last_compile": self.last_compile.to_dict() if self.last_compile else None,
        }

    def _delegate(self) -> Any:
        try:
            from ai_edge_litert.interpreter import load_delegate
        except ImportError:
            from tflite_runtime.interpreter import load_delegate
        options = {"device": self.device} if self.device else {}
        return load_delegate(EDGETPU_LIBRARY, options)

    def _load(self, int8_model: bytes) -> TFLiteRunnable:
        if _COMPILED_MARKER in int8_model:
            compiled = int8_model
        else:
            compiled, self.last_compile = compile_for_edgetpu(int8_model, timeout_s=self.compiler_timeout_s)
        interpreter = interpreter_class()(model_content=compiled, experimental_delegates=[self._delegate()])
        runnable = TFLiteRunnable(interpreter, warm_invokes=1)
        if self.last_compile is not None and _COMPILED_MARKER not in int8_model:
            runnable.details["edgetpu_compile"] = self.last_compile.to_dict()
        return runnable

    def prepare_op(self, op: OpSpec) -> Runnable:
        model = build_op_tflite(op, int8=True, seed=int(op.key[12:20], 16) % (1 << 31), allow_grouped_conv=False)
        return self._load(model)

    def prepare_model(self, onnx_model: bytes) -> Runnable:
        """A full-integer .tflite (compiled or not); ONNX payloads are refused with the conversion to do."""
        check_tflite_payload(onnx_model)
        return self._load(onnx_model)

    def prepare_empty(self) -> Runnable:
        return self._load(build_identity_tflite(int8=True))


__all__ = [
    "CpuFallback",
    "EdgeTPUBackend",
    "EdgeTPUCompileReport",
    "compile_for_edgetpu",
    "parse_compiler_log",
    "usb_accelerator_present",
]
