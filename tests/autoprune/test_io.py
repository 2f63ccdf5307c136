import os
import threading
import time

import pytest

from autoprune.io import BackgroundWriter, atomic_write_text


def test_jobs_run_in_order_off_the_calling_thread(tmp_path):
    seen = []

    def job(i):
        seen.append((i, threading.current_thread() is threading.main_thread()))
        atomic_write_text(tmp_path / "last.txt", str(i))

    with BackgroundWriter() as writer:
        for i in range(20):
            writer.submit(job, i)
    assert [i for i, _ in seen] == list(range(20))
    assert not any(on_main for _, on_main in seen)
    assert (tmp_path / "last.txt").read_text() == "19"


def test_a_failed_job_is_raised_by_the_next_submit_and_later_jobs_do_not_run():
    ran = []

    def fail():
        raise OSError("disk full")

    writer = BackgroundWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(ran.append, 1)
    writer.close()
    assert ran == []


def test_leaving_on_an_exception_still_finishes_the_job_in_flight(tmp_path):
    def slow_write():
        time.sleep(0.3)  # still writing when the caller is interrupted
        atomic_write_text(tmp_path / "state.txt", "episode 4")

    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter() as writer:
            writer.submit(slow_write)
            raise KeyboardInterrupt
    assert (tmp_path / "state.txt").read_text() == "episode 4"


def test_atomic_writes_respect_the_umask(tmp_path):
    import os
    import stat

    from autoprune import io as aio

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(tmp_path / "atomic.txt").st_mode) == 0o666 & ~aio._UMASK


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys

    from autoprune.errors import AutopruneError
    from autoprune.io import WriterLock

    path = tmp_path / ".lock"
    with WriterLock(path, "run directory X"):
        # another process is refused, with this process's PID
        code = ("import sys\nfrom autoprune.io import WriterLock\nfrom autoprune.errors import AutopruneError\n"
                f"try:\n    WriterLock({str(path)!r}, 'run directory X')\n"
                "except AutopruneError as e:\n    print(e); sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 3 and f"PID {os.getpid()}" in done.stdout and "run directory X" in done.stdout
    # released: it can be taken again, also after the holder is gone without releasing
    WriterLock(path, "run directory X").release()
    holder = subprocess.Popen([sys.executable, "-c", f"from autoprune.io import WriterLock\n"
                               f"lock = WriterLock({str(path)!r}, 'x')\nimport os\nos._exit(0)\n"])
    holder.wait(timeout=60)
    WriterLock(path, "run directory X").release()
    with pytest.raises(AutopruneError, match="not a run directory"):
        from autoprune.runs import Run

        Run.open(tmp_path / "nothing", write=True)


def test_a_released_lock_leaves_no_file_and_a_dead_holder_s_file_is_taken_over(tmp_path):
    from autoprune.io import WriterLock

    path = tmp_path / ".lock"
    with WriterLock(path, "this"):
        assert path.is_file()
    assert not path.exists()
    path.write_text("12345\n")  # left by a process that was killed: its lock died with it
    lock = WriterLock(path, "this")
    assert path.read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not path.exists()
