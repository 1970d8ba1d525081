package main

import (
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// pace sends 0..total-1 on due, slot i at start + i*interval, then closes
// it. On Linux it waits on a periodic timerfd read through the runtime's
// poller: the Go timer behind time.Sleep wakes up to a millisecond late
// when nothing else runs (epoll_wait takes milliseconds), which would add
// as much to every latency measured from the schedule.
func pace(start time.Time, interval time.Duration, total int64, due chan<- int64) error {
	defer close(due)
	const clockMonotonic, tfdNonblock, tfdCloexec = 1, syscall.O_NONBLOCK, syscall.O_CLOEXEC
	fd, _, errno := syscall.Syscall(syscall.SYS_TIMERFD_CREATE, clockMonotonic, tfdNonblock|tfdCloexec, 0)
	if errno != 0 {
		return paceSleep(start, interval, total, due)
	}
	f := os.NewFile(fd, "timerfd")
	defer f.Close()
	first := time.Until(start)
	if first <= 0 {
		first = time.Nanosecond
	}
	spec := [2]syscall.Timespec{syscall.NsecToTimespec(int64(interval)), syscall.NsecToTimespec(int64(first))}
	if _, _, errno := syscall.Syscall6(syscall.SYS_TIMERFD_SETTIME, fd, 0, uintptr(unsafe.Pointer(&spec)), 0, 0, 0); errno != 0 {
		return fmt.Errorf("timerfd_settime: %w", errno)
	}
	// The timer only wakes the pacer; the clock says which slots are due.
	// (Counting the timer's expirations instead drifts a whole tick ahead
	// of the clock after a late wake-up.) The timer was armed a little
	// after start was read, so it never wakes before a slot is due.
	var buf [8]byte
	var i int64
	for i < total {
		if _, err := f.Read(buf[:]); err != nil {
			return fmt.Errorf("read timerfd: %w", err)
		}
		for n := int64(time.Since(start)/interval) + 1; i < n && i < total; i++ {
			due <- i
		}
	}
	return nil
}
