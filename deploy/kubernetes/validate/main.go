// Command validate checks the kustomize base in deploy/kubernetes offline: every file
// the kustomization lists is strict-decoded into its Kubernetes API type (an unknown or
// misspelt field, a wrong type or a duplicate key is an error), the kustomization lists
// every manifest in the directory, and the parts agree with each other and with what
// runservice needs (probes, grace period, selectors, secrets, security context).
//
// Usage: go run . [DIR]   (DIR defaults to "..", the kustomize base)
//
// It prints one line per problem and exits 1 if there is any.
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// kustomization is the part of kustomize's Kustomization this base uses. Decoding it
// strictly refuses any other field, so a field added to kustomization.yaml must be
// added here too (on purpose: a typo such as "resource:" would otherwise pass).
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

// manifests holds the decoded objects, one of each kind the base must contain.
type manifests struct {
	deployment *appsv1.Deployment
	service    *corev1.Service
	pdb        *policyv1.PodDisruptionBudget
}

func main() {
	dir := ".."
	if len(os.Args) > 1 {
		dir = os.Args[1]
	}
	problems := validate(dir)
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, p)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
	fmt.Printf("%s: kustomization and manifests are valid\n", dir)
}

// validate returns every problem found in the base at dir.
func validate(dir string) []string {
	k, err := readKustomization(dir)
	if err != nil {
		return []string{err.Error()}
	}
	problems := checkListed(dir, k.Resources)
	var m manifests
	for _, name := range k.Resources {
		if err := decodeInto(&m, filepath.Join(dir, name)); err != nil {
			problems = append(problems, err.Error())
		}
	}
	if len(problems) > 0 {
		return problems
	}
	return append(problems, crossCheck(m)...)
}

func readKustomization(dir string) (*kustomization, error) {
	path := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		return nil, fmt.Errorf("%s: want apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization", path)
	}
	return &k, nil
}

// checkListed reports manifests in dir that the kustomization leaves out, and listed
// resources that are missing or listed twice.
func checkListed(dir string, resources []string) []string {
	var problems []string
	listed := map[string]bool{}
	for _, r := range resources {
		if listed[r] {
			problems = append(problems, fmt.Sprintf("kustomization.yaml lists %s twice", r))
		}
		listed[r] = true
		if _, err := os.Stat(filepath.Join(dir, r)); err != nil {
			problems = append(problems, fmt.Sprintf("kustomization.yaml lists %s, which does not exist", r))
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return append(problems, err.Error())
	}
	var missing []string
	for _, e := range entries {
		name := e.Name()
		isYAML := strings.HasSuffix(name, ".yaml") || strings.HasSuffix(name, ".yml")
		if e.IsDir() || !isYAML || name == "kustomization.yaml" || listed[name] {
			continue
		}
		missing = append(missing, name)
	}
	sort.Strings(missing)
	for _, name := range missing {
		problems = append(problems, fmt.Sprintf("kustomization.yaml does not list %s", name))
	}
	return problems
}

// decodeInto strict-decodes the one object in path into the typed field of m its kind
// names.
func decodeInto(m *manifests, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	// sigs.k8s.io/yaml decodes the first document only: a second one would go unchecked.
	if strings.Contains("\n"+string(data), "\n---") {
		return fmt.Errorf("%s: keep one object per file (no --- separators)", path)
	}
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(data, &tm); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var target any
	switch tm.APIVersion + " " + tm.Kind {
	case "apps/v1 Deployment":
		m.deployment = &appsv1.Deployment{}
		target = m.deployment
	case "v1 Service":
		m.service = &corev1.Service{}
		target = m.service
	case "policy/v1 PodDisruptionBudget":
		m.pdb = &policyv1.PodDisruptionBudget{}
		target = m.pdb
	default:
		return fmt.Errorf("%s: unexpected apiVersion %q kind %q", path, tm.APIVersion, tm.Kind)
	}
	if err := yaml.UnmarshalStrict(data, target); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// crossCheck checks that the objects fit together and fit runservice.
func crossCheck(m manifests) []string {
	if m.deployment == nil || m.service == nil || m.pdb == nil {
		return []string{"the base needs a Deployment, a Service and a PodDisruptionBudget"}
	}
	var errs []error
	pod := m.deployment.Spec.Template
	podLabels := labels.Set(pod.Labels)
	errs = append(errs, selects("Deployment", m.deployment.Spec.Selector, podLabels))
	errs = append(errs, selects("PodDisruptionBudget", m.pdb.Spec.Selector, podLabels))
	if len(m.service.Spec.Selector) == 0 ||
		!labels.SelectorFromSet(m.service.Spec.Selector).Matches(podLabels) {
		errs = append(errs, errors.New("the Service's selector does not select the Deployment's pods"))
	}
	if m.pdb.Spec.MaxUnavailable == nil || m.pdb.Spec.MaxUnavailable.IntValue() != 1 {
		errs = append(errs, errors.New("the PodDisruptionBudget needs maxUnavailable: 1"))
	}
	errs = append(errs, checkPod(pod.Spec)...)
	errs = append(errs, checkServicePort(m.service, pod.Spec)...)
	var problems []string
	for _, err := range errs {
		if err != nil {
			problems = append(problems, err.Error())
		}
	}
	return problems
}

func selects(what string, selector *metav1.LabelSelector, podLabels labels.Set) error {
	s, err := metav1.LabelSelectorAsSelector(selector)
	if err != nil {
		return fmt.Errorf("the %s's selector: %w", what, err)
	}
	if selector == nil || s.Empty() || !s.Matches(podLabels) {
		return fmt.Errorf("the %s's selector does not select the Deployment's pods", what)
	}
	return nil
}
