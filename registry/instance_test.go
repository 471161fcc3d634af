package registry_test

import (
	"testing"

	"github.com/rollcall-go/rollcall/registry"
)

func TestMatchMetadata(t *testing.T) {
	values := []string{"v2", "v3"}
	keep := registry.MatchMetadata(registry.MetaVersion, values...)
	values[0] = "v9" // the predicate keeps its own copy
	for _, tc := range []struct {
		md   map[string]string
		want bool
	}{
		{map[string]string{"version": "v2"}, true},
		{map[string]string{"version": "v3"}, true},
		{map[string]string{"version": "v1"}, false},
		{nil, false},
	} {
		if got := keep(registry.Instance{Metadata: tc.md}); got != tc.want {
			t.Errorf("MatchMetadata(version, v2, v3) on %v = %v, want %v", tc.md, got, tc.want)
		}
	}
	if !registry.MatchMetadata("canary", "")(registry.Instance{}) {
		t.Error(`MatchMetadata(canary, "") does not keep an instance without the key`)
	}
}
