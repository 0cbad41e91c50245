"""Make sure a Redis answers at REDIS_URL: start a local one if it is missing,
installing Debian's redis-server first when running as root; otherwise say exactly
what to do."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class Command(BaseCommand):
    help = "Start a local Redis if none answers at REDIS_URL."

    def handle(self, *args, **options) -> None:
        url = settings.REDIS_URL
        if _ping(url):
            self.stdout.write(f"Redis answers at {url}")
            return
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise CommandError(f"No Redis answers at {url}; it is not local, so start it there or set REDIS_URL.")
        if not shutil.which("redis-server"):
            if os.geteuid() == 0 and shutil.which("apt-get"):
                self.stdout.write("installing Debian's redis-server ...")
                subprocess.run(["apt-get", "update", "-qq"], check=False)
                subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True)
            else:
                raise CommandError("No Redis answers at {url} and redis-server is not installed. Install it "
                                   "(sudo apt-get install redis-server) or point REDIS_URL at a running Redis.")
        data_dir = settings.BASE_DIR / "var" / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", parsed.hostname or "127.0.0.1",
                        "--port", str(parsed.port or 6379), "--dir", str(data_dir),
                        "--logfile", str(data_dir / "redis.log")], check=True)
        for _ in range(50):
            if _ping(url):
                self.stdout.write(f"started a local Redis at {url}")
                return
            time.sleep(0.1)
        raise CommandError(f"started redis-server but it does not answer at {url}; see {data_dir / 'redis.log'}")
