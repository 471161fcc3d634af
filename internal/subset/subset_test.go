package subset

import (
	"fmt"
	"slices"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func keys(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)
	}
	return out
}

// subsets returns the keys of each client's subset.
func subsets(ks []string, size, clients int) [][]string {
	out := make([][]string, clients)
	for c := range out {
		for _, i := range Choose(ks, size, c) {
			out[c] = append(out[c], ks[i])
		}
	}
	return out
}

func TestSpreadIsEven(t *testing.T) {
	// The figures: 100 clients over 50 instances (subsets of 10),
	// every instance's client count within ±20% of the mean; and a fleet
	// where n is not a multiple of the size.
	for _, tc := range []struct{ clients, n, size int }{{100, 50, 10}, {100, 49, 10}, {300, 1000, 20}, {1000, 300, 32}} {
		t.Run(fmt.Sprintf("%d clients, %d instances, size %d", tc.clients, tc.n, tc.size), func(t *testing.T) {
			ks := keys(tc.n)
			counts := map[string]int{}
			for c, s := range subsets(ks, tc.size, tc.clients) {
				if per := (tc.n + tc.size - 1) / tc.size; len(s) != tc.n/per && len(s) != tc.n/per+1 || len(s) > tc.size {
					t.Fatalf("client %d: subset of %d", c, len(s))
				}
				for _, k := range s {
					counts[k]++
				}
			}
			total := 0
			for _, n := range counts {
				total += n
			}
			mean := float64(total) / float64(tc.n)
			for _, k := range ks {
				if n := float64(counts[k]); n < mean*0.8 || n > mean*1.2 {
					t.Errorf("instance %s serves %v clients, mean %.1f", k, n, mean)
				}
			}
		})
	}
}

func TestOneInstanceLeavingChangesFewSubsets(t *testing.T) {
	// 100 clients, 50 instances, size 10: 20 clients have each instance; at
	// most about twice that change, each by one instance out and at most
	// one in.
	ks := keys(50)
	before := subsets(ks, 10, 100)
	worst, sum := 0, 0
	for gone := range ks {
		after := subsets(slices.Delete(slices.Clone(ks), gone, gone+1), 10, 100)
		changed := 0
		for c := range before {
			if slices.Equal(before[c], after[c]) {
				continue
			}
			changed++
			out, in := 0, 0
			for _, k := range before[c] {
				if !slices.Contains(after[c], k) {
					out++
				}
			}
			for _, k := range after[c] {
				if !slices.Contains(before[c], k) {
					in++
				}
			}
			if out > 1 || in > 1 {
				t.Errorf("instance %d leaving: client %d lost %d and gained %d instances", gone, c, out, in)
			}
		}
		worst, sum = max(worst, changed), sum+changed
	}
	if worst > 60 {
		t.Errorf("one instance leaving changed the subsets of up to %d of 100 clients", worst)
	}
	t.Logf("one of 50 instances leaving changes the subsets of %.1f of 100 clients on average, at most %d (20 had it)", float64(sum)/float64(len(ks)), worst)
}

func TestChooseIsDeterministicAndOrderFree(t *testing.T) {
	ks := keys(30)
	rev := slices.Clone(ks)
	slices.Reverse(rev)
	for c := range 10 {
		var a, b []string
		for _, i := range Choose(ks, 4, c) {
			a = append(a, ks[i])
		}
		for _, i := range Choose(rev, 4, c) {
			b = append(b, rev[i])
		}
		slices.Sort(a)
		slices.Sort(b)
		if !slices.Equal(a, b) {
			t.Fatalf("client %d: %v from one order, %v from another", c, a, b)
		}
	}
	if got := Choose(ks[:3], 4, 7); !slices.Equal(got, []int{0, 1, 2}) {
		t.Errorf("fewer instances than the size: %v", got)
	}
}

func TestEveryInstanceInOneSubsetPerRound(t *testing.T) {
	for n := 1; n <= 120; n += 7 {
		for size := 1; size <= 25; size += 3 {
			ks := keys(n)
			s := (n + size - 1) / size
			for round := range 2 {
				seen := make([]int, n)
				for slot := range s {
					sub := Choose(ks, size, round*s+slot)
					if len(sub) > size || n > size && len(sub) < n/s {
						t.Fatalf("n=%d size=%d client %d: subset of %d", n, size, round*s+slot, len(sub))
					}
					for _, i := range sub {
						seen[i]++
					}
				}
				for i, c := range seen {
					if c != 1 {
						t.Fatalf("n=%d size=%d round %d: instance %d in %d subsets of the round, want 1", n, size, round, i, c)
					}
				}
			}
		}
	}
}
