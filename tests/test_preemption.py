"""Signals set flags (acted on at a step boundary); only SIGUSR1 asks for a Slurm requeue."""
from __future__ import annotations

import logging
import os
import signal

import pytest

from trainer.preemption import StopRequests, requeue_slurm_job


def test_sigterm_stops_without_requeue_and_usr1_requeues():
    requests = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests.stop_signal == signal.SIGTERM and not requests.requeue
        os.kill(os.getpid(), signal.SIGUSR1)
        assert requests.requeue
        os.kill(os.getpid(), signal.SIGUSR2)
        assert requests.save_now
    finally:
        requests.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_requeue_without_scontrol_says_so(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("PATH", "/nonexistent")
    with caplog.at_level(logging.INFO):
        requeue_slurm_job()
    assert "scontrol is not available" in caplog.text and "--resume auto" in caplog.text


def test_requeue_outside_slurm_is_a_note(monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with caplog.at_level(logging.INFO):
        requeue_slurm_job()
    assert "not a Slurm job" in caplog.text


def test_requeue_is_reported_when_slurm_stops_the_job_during_scontrol(tmp_path, monkeypatch,
                                                                     caplog):
    """Slurm sends SIGTERM to the job's processes, scontrol's too, as the requeue takes effect."""
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f"#!/bin/sh\nkill -TERM $$\necho \"$@\" > {tmp_path / 'calls'}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with caplog.at_level(logging.INFO):
        requeue_slurm_job()
    assert (tmp_path / "calls").read_text() == "requeue 123\n"
    assert "Slurm job 123 requeued" in caplog.text


def test_ctrl_c_is_a_stop_without_requeue_and_a_second_one_stops_at_once(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = signal.getsignal(signal.SIGINT)   # ignored where the suite runs in the background
    requests = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.stop_signal == signal.SIGINT and requests.cancel
        assert not requests.requeue
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        requests.uninstall()
    assert signal.getsignal(signal.SIGINT) == before


def test_under_torchrun_a_repeated_ctrl_c_is_the_same_stop(monkeypatch):
    """torchrun's agent forwards the terminal's Ctrl-C: each worker gets it twice."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r")
    requests = StopRequests().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.stop_signal == signal.SIGINT and requests.cancel
    finally:
        requests.uninstall()
