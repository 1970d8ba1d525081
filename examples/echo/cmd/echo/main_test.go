package main

import (
	"bytes"
	"net"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestRunRefusesBadFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []string // in stderr
	}{
		{"no_flags", nil, []string{"--unit is required", "--region is required"}},
		{"no_region", []string{"--unit", "u1"}, []string{"--region is required"}},
		{"empty_service", []string{"--unit", "u1", "--region", "r", "--service", ""}, []string{"--service must not be empty"}},
		{"bad_listen", []string{"--unit", "u1", "--region", "r", "--listen", "8080"}, []string{`--listen "8080": want host:port`}},
		{"extra_args", []string{"--unit", "u1", "--region", "r", "serve"}, []string{`unexpected arguments ["serve"]`}},
		{"unknown_flag", []string{"--port", "1"}, []string{"flag provided but not defined: -port"}},
		{"bad_syntax", []string{"--unit"}, []string{"flag needs an argument: -unit"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if code := run(tt.args, &stderr); code != 2 {
				t.Errorf("exit code = %d, want 2\n%s", code, &stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr does not say %q:\n%s", w, &stderr)
				}
			}
		})
	}
}

func TestRunHelpExitsZero(t *testing.T) {
	var stderr bytes.Buffer
	if code := run([]string{"-h"}, &stderr); code != 0 {
		t.Errorf("exit code = %d, want 0", code)
	}
	if !strings.Contains(stderr.String(), "-listen address") {
		t.Errorf("no usage in stderr:\n%s", &stderr)
	}
}

func TestRunListenFailureExitsOne(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var stderr bytes.Buffer
	if code := run([]string{"--unit", "u1", "--region", "r", "--listen", ln.Addr().String()}, &stderr); code != 1 {
		t.Errorf("exit code = %d, want 1\n%s", code, &stderr)
	}
	if !strings.Contains(stderr.String(), "listen failed") {
		t.Errorf("stderr does not explain:\n%s", &stderr)
	}
}
