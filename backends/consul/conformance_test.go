package consul_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/rollcall-go/rollcall/conformance"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	conformance.RunConformanceTests(t, newHarness)
}
