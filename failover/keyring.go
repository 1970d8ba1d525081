package failover

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"strings"
	"time"
)

// ParseKeys reads a gossip keyring file: one base64 key per line (16, 24
// or 32 bytes), the first line encrypts and every line decrypts; blank
// lines and lines starting with # are skipped.
func ParseKeys(text string) ([][]byte, error) {
	var keys [][]byte
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: not base64: %w", i+1, err)
		}
		if err := checkKey(k); err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("no key: a keyring file holds one base64 key per line (cellmesh gossip-key makes one)")
	}
	return keys, nil
}

// ReadKeyFile reads a keyring file (see ParseKeys).
func ReadKeyFile(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gossip keyring: %w", err)
	}
	keys, err := ParseKeys(string(b))
	if err != nil {
		return nil, fmt.Errorf("gossip keyring %s: %w", path, err)
	}
	return keys, nil
}

// NewKey returns a new random 32-byte key, base64 as keyring files hold it.
func NewKey() string {
	var k [32]byte
	_, _ = rand.Read(k[:])
	return base64.StdEncoding.EncodeToString(k[:])
}

// WatchKeyFile replaces the keyring with the file's keys whenever the
// file changes: checked every interval (0: only on kick) and at once when
// kick receives, until ctx ends. A file that does not load is logged and
// changes nothing. See SetKeys for the order of a rotation.
func (ms *Membership) WatchKeyFile(ctx context.Context, path string, interval time.Duration, kick <-chan struct{}) {
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	last, _ := os.ReadFile(path)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		case <-kick:
		}
		b, err := os.ReadFile(path)
		if err != nil {
			ms.log.Warn("gossip keyring not read; keeping the keys held", "path", path, "error", err)
			continue
		}
		if bytes.Equal(b, last) {
			continue
		}
		keys, err := ParseKeys(string(b))
		if err == nil {
			err = ms.SetKeys(keys)
		}
		if err != nil {
			ms.log.Error("gossip keyring refused; keeping the keys held: fix the file", "path", path, "error", err)
			continue
		}
		last = b
	}
}
