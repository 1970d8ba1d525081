package proxy

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// A body given to a next attempt before any was read reaches that attempt
// whole, while the attempt abandoned (whose transport may still read on
// its own goroutine) reads nothing; once an attempt has read, there is no
// next one.
func TestRetryBodyAbandonedAttemptReadsNothing(t *testing.T) {
	b := &retryBody{rc: io.NopCloser(strings.NewReader("the whole body")), attempt: 1}
	first := b.forAttempt()
	if !b.advance() {
		t.Fatal("advance refused before any read")
	}
	second := b.forAttempt()
	if n, err := first.Read(make([]byte, 4)); n != 0 || !errors.Is(err, errAbandonedAttempt) {
		t.Fatalf("abandoned attempt read %d bytes, %v", n, err)
	}
	got, err := io.ReadAll(second)
	if err != nil || string(got) != "the whole body" {
		t.Fatalf("next attempt read %q, %v", got, err)
	}
	if b.advance() {
		t.Fatal("advance allowed after an attempt read the body")
	}
	if !b.sending() {
		t.Fatal("not sending after a read")
	}
	var none *retryBody
	if !none.advance() {
		t.Fatal("a request without a body cannot be sent again")
	}
}
