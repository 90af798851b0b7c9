"""A SIGTERM while a service is still starting (risk rebuilding from its database) stops it
cleanly once it exists, instead of the signal's default action (exit -15, nothing closed)."""
from __future__ import annotations

import os
import signal

from shared.runtime import EarlyStop


class Service:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


def test_a_stop_asked_before_the_service_exists_reaches_it_and_later_ones_too():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopper = EarlyStop()
        os.kill(os.getpid(), signal.SIGTERM)  # handled on this (main) thread before kill returns to us
        assert stopper.asked
        service = Service()
        stopper.attach(service)
        assert service.stops == 1
        os.kill(os.getpid(), signal.SIGINT)
        assert service.stops == 2
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_without_a_stop_the_service_is_only_attached():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopper = EarlyStop()
        service = Service()
        stopper.attach(service)
        assert service.stops == 0 and not stopper.asked
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
