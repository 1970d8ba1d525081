//go:build !linux

package main

import "time"

func pace(start time.Time, interval time.Duration, total int64, due chan<- int64) error {
	defer close(due)
	return paceSleep(start, interval, total, due)
}
